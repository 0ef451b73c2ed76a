"""Save adapters in the PEFT LoRA format, so peft (and every tool that reads it) loads lorafit's adapters.

A folder holds `adapter_config.json` and `adapter_model.safetensors` exactly as peft writes them, plus
`lorafit.json` with what only lorafit needs (semantic targets, which modules were sliced, the recipe).
A q/v adapter on a fused projection is stored as one LoRA of rank n·r on the whole module: A stacks the
slices' A over each other, B is block-structured with zero k features, and alpha is scaled so peft's
alpha/R (or alpha/sqrt(R) under rsLoRA) equals ours. The format itself lives in `lorafit.adapter.format`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorafit import __version__
from lorafit.adapter.convert import fan_in_fan_out, module_facts, peft_kind, peft_rank_and_alpha, peft_tensors
from lorafit.adapter.format import CONFIG_FILE, WEIGHTS_FILE, adapter_config, selecting_suffixes, weight_key
from lorafit.errors import LorafitError
from lorafit.lora.variants import LoRALayer, model_variant
from lorafit.model.inject import lora_layers, model_targets
from lorafit.model.targets import fused_slices, matches_suffix
from lorafit.storage import json_text, write_folder

LORAFIT_FILE = "lorafit.json"


def save_adapter(
    model: nn.Module, directory: Path, *, base_model: str, targets: list[str], extra: dict | None = None
) -> int:
    """Write adapter_config.json, adapter_model.safetensors and lorafit.json atomically.

    Returns the size in bytes of the safetensors file written."""
    files = adapter_files(model, base_model=base_model, targets=targets, extra=extra)
    write_folder(Path(directory), files)
    return len(files[WEIGHTS_FILE])


def adapter_files(
    model: nn.Module, *, base_model: str, targets: list[str], extra: dict | None = None
) -> dict[str, bytes]:
    """The adapter folder's files as bytes, all serialised before any is written: a bad value writes nothing."""
    from safetensors.torch import save

    layers = lora_layers(model)
    if not layers:
        raise LorafitError("the model has no LoRA layers to save; inject or load an adapter first")
    return {
        WEIGHTS_FILE: save(adapter_tensors(layers), metadata={"format": "pt"}),
        CONFIG_FILE: json_text(peft_config(model, layers, base_model)).encode(),
        LORAFIT_FILE: json_text(lorafit_facts(model, layers, targets, extra)).encode(),
    }


def adapter_tensors(layers: dict[str, LoRALayer]) -> dict[str, torch.Tensor]:
    """peft's state dict: every layer in peft's plain form (lorafit.adapter.convert), in fp32 on the CPU."""
    tensors = {}
    for path, layer in layers.items():
        for part, weight in peft_tensors(layer).items():
            tensors[weight_key(path, part, peft_kind(layer))] = weight.to("cpu", torch.float32).contiguous().clone()
    return tensors


def peft_config(model: nn.Module, layers: dict[str, LoRALayer], base_model: str) -> dict:
    """adapter_config.json: one rank and alpha for most modules, rank_pattern/alpha_pattern for the rest."""
    use_rslora = all(layer.use_rslora for layer in layers.values())
    values = {path: peft_rank_and_alpha(layer, use_rslora) for path, layer in layers.items()}
    module_paths = (path for path, _ in model.named_modules())
    return adapter_config(
        values,
        selecting_suffixes(module_paths, list(layers)),
        base_model=base_model,
        use_rslora=use_rslora,
        fan_in_fan_out=any(fan_in_fan_out(layer) for layer in layers.values()),
        dropout=max(getattr(layer.dropout, "p", 0.0) for layer in layers.values()),
        flags=model_variant(layers).peft_flags,
    )


def lorafit_facts(model: nn.Module, layers: dict[str, LoRALayer], targets: list[str], extra: dict | None) -> dict:
    """lorafit.json: what peft's format cannot say — the targets asked for and which modules were sliced."""
    variant = model_variant(layers)
    return {
        "lorafit_version": __version__,
        "model_type": getattr(model.config, "model_type", None),
        "targets": list(targets),
        "variant": variant.saved_as or variant.name,  # what the adapter loads as
        "modules": {path: _module_facts(model, path, layer, targets) for path, layer in layers.items()},
        "extra": extra or {},
    }


def _module_facts(model: nn.Module, path: str, layer: LoRALayer, targets: list[str]) -> dict:
    facts = module_facts(layer)
    if facts["slices"] is not None:
        facts["targets"] = _slice_targets(model, path, layer.out_index, targets)
    return facts


def _slice_targets(model: nn.Module, path: str, out_index: tuple[int, ...], targets: list[str]) -> list[str] | None:
    """The semantic targets whose features make up a module's slices, or None if the table does not explain them."""
    table = model_targets(model)
    names = [
        t for t in dict.fromkeys(targets) if t in table and table[t].features and matches_suffix(path, table[t].module)
    ]
    slices = fused_slices(model.config, names, table)
    if slices is None or tuple(f for features in slices.values() for f in features) != out_index:
        return None
    return list(slices)
