"""Parameter counts and static memory estimates of a LoRA model, as JSON-ready dicts (`info`, the report)."""

from __future__ import annotations

from torch import nn

from lorafit.lora.linear import LoRALinear
from lorafit.model.inject import count_parameters, inject_lora
from lorafit.model.load import DTYPES, decoder_blocks, load_config, meta_model, resolve_precision
from lorafit.model.quantize import frozen_weight_bytes

ADAM_STATE_BYTES = 8  # AdamW keeps two fp32 moments per trained parameter


LORA_BYTES = 4  # A and B are always kept in fp32


def module_rows(layers: dict[str, LoRALinear]) -> list[dict]:
    return [
        {"name": path, "shape": list(layer.weight_shape), "lora_params": layer.lora_params}
        for path, layer in layers.items()
    ]


def adapter_tensor_bytes(layers: dict[str, LoRALinear]) -> int:
    """Bytes of the tensors in adapter_model.safetensors, where a sliced layer's B is stored full-width."""
    total = 0
    for layer in layers.values():
        stacked_rank, d_in = layer.lora_A.shape
        d_out, _ = layer.weight_shape
        total += stacked_rank * (d_in + d_out) * LORA_BYTES
        if hasattr(layer, "lora_magnitude"):
            total += d_out * LORA_BYTES  # DoRA's magnitude vector, stored over every output row
    return total


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
    model: nn.Module, layers: dict[str, LoRALinear], weight_bytes: int, frozen_bytes: int | None = None
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


def describe(
    model_name: str, rank: int, alpha: float, targets: list[str], dtype: str = "auto", variant: str = "lora",
    quantize: str = "none",
) -> dict:
    """What LoRA on `targets` would train, computed on the meta device: only config.json is read."""
    config = load_config(model_name)
    model = meta_model(config)
    # AdaLoRA is counted as the plain LoRA it exports at this rank (its Λ and init_rank pairs are not counted)
    layers = inject_lora(model, targets, rank, alpha, variant="lora" if variant == "adalora" else variant)
    weights = resolve_precision("auto", "auto")[0] if dtype == "auto" else dtype  # as training here would load it
    itemsize = DTYPES[weights].itemsize
    frozen = None
    if quantize != "none":
        frozen = frozen_weight_bytes(model, planned=decoder_blocks(model), itemsize=itemsize)
    report = parameter_report(model, layers, itemsize, frozen)
    if quantize != "none":
        report["quantize"] = quantize
    report["model"] = model_name
    report["model_type"] = config.model_type
    report["dtype"] = weights
    report["lora"] = {"rank": rank, "alpha": alpha, "targets": targets, "variant": variant}
    return report
