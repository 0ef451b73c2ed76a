"""Save adapters in the PEFT LoRA format, so peft (and every tool that reads it) loads lorafit's adapters.

A folder holds `adapter_config.json` and `adapter_model.safetensors` exactly as peft writes them, plus
`lorafit.json` with what only lorafit needs (semantic targets, which modules were sliced, the recipe).
A q/v adapter on a fused projection is stored as one LoRA of rank n·r on the whole module: A stacks the
slices' A over each other, B is block-structured with zero k features, and alpha is scaled so peft's
alpha/R (or alpha/sqrt(R) under rsLoRA) equals ours. The format itself lives in `lorafit.adapter.format`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from lorafit import __version__
from lorafit.adapter.format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    adapter_config,
    peft_alpha,
    selecting_suffixes,
    weight_key,
)
from lorafit.errors import LorafitError
from lorafit.lora.adalora import AdaLoRALinear
from lorafit.lora.embedding import LoRAEmbedding
from lorafit.model.inject import (
    LoRALayer,
    lora_layers,
    model_targets,
    variant_of,
)
from lorafit.model.targets import fused_slices, matches_suffix
from lorafit.storage import write_folder

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
        CONFIG_FILE: _json_bytes(peft_config(model, layers, base_model)),
        LORAFIT_FILE: _json_bytes(lorafit_facts(model, layers, targets, extra)),
    }


def adapter_tensors(layers: dict[str, LoRALayer]) -> dict[str, torch.Tensor]:
    """peft's state dict: every layer as a plain LoRA of rank n_slices·r on its whole module, in fp32."""
    tensors = {}
    for path, layer in layers.items():
        for part, weight in layer.saved_tensors().items():
            tensors[weight_key(path, part, _kind(layer))] = weight.to("cpu", torch.float32).contiguous().clone()
    return tensors


def _kind(layer: LoRALayer) -> str:
    return "embedding" if isinstance(layer, LoRAEmbedding) else "linear"


def peft_config(model: nn.Module, layers: dict[str, LoRALayer], base_model: str) -> dict:
    """adapter_config.json: one rank and alpha for most modules, rank_pattern/alpha_pattern for the rest."""
    use_rslora = all(layer.use_rslora for layer in layers.values())
    values = {path: _peft_rank_and_alpha(layer, use_rslora) for path, layer in layers.items()}
    module_paths = (path for path, _ in model.named_modules())
    return adapter_config(
        values,
        selecting_suffixes(module_paths, list(layers)),
        base_model=base_model,
        use_rslora=use_rslora,
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers.values()),
        dropout=max(getattr(layer.dropout, "p", 0.0) for layer in layers.values()),
        use_dora=variant_of(layers) == "dora",
    )


def _peft_rank_and_alpha(layer: LoRALayer, peft_rslora: bool) -> tuple[int, float]:
    if isinstance(layer, AdaLoRALinear):  # ranks differ by module: keep the scaling, alpha/r_init
        rank = layer.plain_rank
        return rank, layer.scaling * (math.sqrt(rank) if peft_rslora else rank)
    n_slices = layer.plain_pairs
    alpha = peft_alpha(layer.alpha, layer.rank, n_slices, use_rslora=layer.use_rslora, peft_rslora=peft_rslora)
    return n_slices * layer.rank, alpha


def lorafit_facts(model: nn.Module, layers: dict[str, LoRALayer], targets: list[str], extra: dict | None) -> dict:
    """lorafit.json: what peft's format cannot say — the targets asked for and which modules were sliced."""
    return {
        "lorafit_version": __version__,
        "model_type": getattr(model.config, "model_type", None),
        "targets": list(targets),
        "variant": variant_of(layers),
        "modules": {path: _module_facts(model, path, layer, targets) for path, layer in layers.items()},
        "extra": extra or {},
    }


def _module_facts(model: nn.Module, path: str, layer: LoRALayer, targets: list[str]) -> dict:
    sliced = layer.slices is not None
    pairs = layer.plain_pairs // len(layer.slice_sizes)  # 2 for a PiSSA/OLoRA adapter saved against W0
    if isinstance(layer, AdaLoRALinear):
        return {"rank": layer.plain_rank, "alpha": _peft_rank_and_alpha(layer, layer.use_rslora)[1],
                "use_rslora": layer.use_rslora, "slices": None, "targets": None, "adalora_ranks": layer.slice_ranks()}
    return {
        "rank": layer.rank * pairs,
        "alpha": peft_alpha(layer.alpha, layer.rank, pairs, use_rslora=layer.use_rslora, peft_rslora=layer.use_rslora),
        "use_rslora": layer.use_rslora,
        "slices": list(layer.slice_sizes) if sliced else None,
        "targets": _slice_targets(model, path, layer, targets) if sliced else None,
    }


def _slice_targets(model: nn.Module, path: str, layer: LoRALayer, targets: list[str]) -> list[str] | None:
    """The semantic targets whose features make up this layer's slices, or None if the table does not explain them."""
    table = model_targets(model)
    names = [
        t for t in dict.fromkeys(targets) if t in table and table[t].features and matches_suffix(path, table[t].module)
    ]
    slices = fused_slices(model.config, names, table)
    if slices is None or tuple(f for features in slices.values() for f in features) != layer.out_index:
        return None
    return list(slices)


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, default=str) + "\n").encode()
