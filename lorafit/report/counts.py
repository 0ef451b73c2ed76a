"""Parameter counts and static memory estimates of a LoRA model, as JSON-ready dicts (`info`, the report)."""

from __future__ import annotations

from torch import nn

from lorafit.adapter.convert import is_parameter
from lorafit.adapter.format import peft_notes
from lorafit.errors import LorafitError
from lorafit.lora.variants import VARIANTS, LoRALayer, layer_variant
from lorafit.model.inject import count_parameters, target_notes, wrap_targets
from lorafit.model.load import DTYPES, decoder_blocks, load_config, meta_model, resolve_precision
from lorafit.model.quantize import check_quantizable, frozen_weight_bytes
from lorafit.recipe import Recipe

ADAM_STATE_BYTES = 8  # AdamW keeps two fp32 moments per trained parameter


LORA_BYTES = 4  # A and B are always kept in fp32


def module_rows(layers: dict[str, LoRALayer]) -> list[dict]:
    """One row per adapted module (or weight parameter: a stack of experts also says how many it holds)."""
    return [
        {"name": path, "shape": list(layer.weight_shape), "lora_params": layer.lora_params,
         **({"experts": layer.experts} if hasattr(layer, "experts") else {})}
        for path, layer in layers.items()
    ]


def adapter_tensor_bytes(layers: dict[str, LoRALayer]) -> int:
    """Bytes of the tensors in adapter_model.safetensors: each variant's registry entry counts its layers' own."""
    return sum(layer_variant(layer).adapter_bytes(layer) for layer in layers.values())


def memory_estimate(total: int, trainable: int, weight_bytes: int, frozen_bytes: int | None = None) -> dict:
    """Static training memory in bytes: weights + gradients + AdamW states. Activations are not counted.

    `frozen_bytes` is the frozen weights' real size when some are 4-bit; full fine-tuning is always full precision.
    """
    base = total - trainable
    lora = {
        "weights": (base * weight_bytes if frozen_bytes is None else frozen_bytes) + trainable * LORA_BYTES,
        "gradients": trainable * LORA_BYTES,
        "optimizer": trainable * ADAM_STATE_BYTES,
    }
    # Full fine-tuning trains the base model itself: the LoRA parameters would not exist.
    full = {
        "weights": base * weight_bytes,
        "gradients": base * weight_bytes,
        "optimizer": base * ADAM_STATE_BYTES,
    }
    lora["total"] = sum(lora.values())
    full["total"] = sum(full.values())
    return {
        "lora_estimate": lora,
        "full_finetune_estimate": full,
        "counted": "weights, gradients and AdamW states; not activations, buffers or framework overhead",
    }


def parameter_report(
    model: nn.Module, layers: dict[str, LoRALayer], weight_bytes: int, frozen_bytes: int | None = None
) -> dict:
    counts = count_parameters(model)
    return {
        "total_params": counts.total,
        "trainable_params": counts.trainable,
        "trainable_ratio": counts.ratio,
        "adapter_bytes": adapter_tensor_bytes(layers),
        "modules": module_rows(layers),
        "memory": memory_estimate(counts.total, counts.trainable, weight_bytes, frozen_bytes),
    }


def wrap_with_notes(model: nn.Module, lora) -> tuple[dict[str, LoRALayer], list[str]]:
    """The recipe's LoRA layers on `model`, and one line for each thing its targets do that one might not expect:
    what "all-linear" adapts or leaves out, dropout that expert LoRA has none of, modules peft would not load. A rank
    above a layer's smaller side is refused here, for train's preflight, `info` and the dry run alike."""
    notes = target_notes(model, lora.targets, lora.dropout)
    layers = wrap_targets(model, lora)
    for path, layer in layers.items():  # above it the update is no longer low-rank (nor can a slice's rows be reached)
        if layer.rank > layer.max_rank:
            raise LorafitError(f"{VARIANTS[lora.variant].rank_name} = {layer.rank} is more than {path}'s smaller side "
                               f"({layer.max_rank}); use a rank of at most {layer.max_rank}")
    modules = [key for key, layer in layers.items() if not is_parameter(layer)]
    return layers, notes + peft_notes(model.config.model_type, modules)


def describe(recipe: Recipe, model_name: str | None = None) -> dict:
    """What the recipe's LoRA (its variant, start, quantization and targets) would train, computed on the meta device
    from the config of its model (or of `model_name`) alone. `info`, the dry run and their tables show it."""
    name = model_name or recipe.model.name
    config = load_config(name, trust_remote_code=recipe.model.trust_remote_code)
    model = meta_model(config)
    lora, dtype, quantize = recipe.lora, recipe.model.dtype, recipe.model.quantize
    if quantize != "none":
        check_quantizable(model)
    layers, notes = wrap_with_notes(model, lora)
    weights = resolve_precision("auto", "auto")[0] if dtype == "auto" else dtype  # as training here would load it
    itemsize = DTYPES[weights].itemsize
    frozen = None
    if quantize != "none":
        frozen = frozen_weight_bytes(model, planned=decoder_blocks(model), itemsize=itemsize)
    report = parameter_report(model, layers, itemsize, frozen)
    if quantize != "none":
        report["quantize"] = quantize
    report["model"] = name
    report["model_type"] = config.model_type
    report["dtype"] = weights
    variant = VARIANTS[lora.variant]
    report["lora"] = {"rank": variant.rank(lora), "alpha": lora.alpha, "targets": lora.targets, "variant": variant.name}
    if variant.exports:
        report["lora"]["exports"] = variant.exports
    report["notes"] = notes  # what the targets do that one might not expect (lorafit.model.inject.target_notes)
    return report
