"""Save and load adapters in the PEFT LoRA format, so peft and lorafit read each other's adapters.

A folder holds `adapter_config.json` and `adapter_model.safetensors` exactly as peft writes them, plus
`lorafit.json` with what only lorafit needs (semantic targets, which modules were sliced, the recipe).
A q/v adapter on a fused projection is stored as one LoRA of rank n·r on the whole module: A stacks the
slices' A over each other, B is block-structured with zero k features, and alpha is scaled so peft's
alpha/R (or alpha/sqrt(R) under rsLoRA) equals ours. The format itself lives in `lorafit.peft_format`;
this module applies it to a model. Weights are read from safetensors only, never pickles.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lorafit import __version__
from lorafit.adalora import AdaLoRALinear
from lorafit.embedding import LoRAEmbedding
from lorafit.errors import LorafitError
from lorafit.inject import (
    LoRALayer,
    freeze_and_wrap,
    is_embedding,
    is_projection,
    lora_layer,
    lora_layers,
    model_targets,
    stores_transposed,
    variant_of,
)
from lorafit.lora import is_block_structured, projection_shape
from lorafit.peft_format import (
    CONFIG_FILE,
    PICKLE_FILE,
    TABLE,
    TENSOR_NAMES,
    WEIGHTS_FILE,
    adapter_config,
    check_config,
    check_parts,
    check_selected,
    check_table,
    lora_tensors,
    lorafit_alpha,
    peft_alpha,
    rank_and_alpha,
    selecting_suffixes,
    weight_key,
)
from lorafit.storage import write_folder
from lorafit.targets import Target, fused_slices, matches_suffix

LORAFIT_FILE = "lorafit.json"


# ---------------------------------------------------------------- saving


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


# ---------------------------------------------------------------- reading


def read_adapter_config(directory: Path) -> dict:
    """adapter_config.json of a PEFT LoRA adapter folder whose weights lorafit can load; clear errors otherwise."""
    directory = Path(directory)
    if not directory.exists():
        raise LorafitError(f"adapter folder {directory} does not exist; pass the adapter/ folder of a run")
    if not (directory / CONFIG_FILE).is_file():
        raise LorafitError(
            f"{directory} is not an adapter directory (no {CONFIG_FILE}); pass the adapter/ folder of a run"
        )
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LorafitError(f"{directory / CONFIG_FILE} is not valid JSON ({error}); re-save the adapter") from error
    if not isinstance(config, dict):
        raise LorafitError(f"{directory / CONFIG_FILE} is not a JSON object; re-save the adapter")
    check_config(directory, config)
    _check_weights_file(directory)
    return config


def _check_weights_file(directory: Path) -> None:
    if (directory / WEIGHTS_FILE).is_file():
        return
    if (directory / PICKLE_FILE).exists():
        raise LorafitError(
            f"{directory} has only {PICKLE_FILE}, a pickle that lorafit never loads; convert it to {WEIGHTS_FILE} "
            "(load it with peft and save_pretrained(..., safe_serialization=True))"
        )
    raise LorafitError(f"{directory} has no {WEIGHTS_FILE}; pass a complete adapter folder")


def read_adapter_weights(directory: Path) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    """{module path: (kind, {"A": [R, d_in], "B": [d_out, R], ...})} from adapter_model.safetensors, in fp32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_FILE
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise LorafitError(f"{path} is not a readable safetensors file ({error}); re-save the adapter") from error
    return lora_tensors(tensors, path)


def _read_facts(directory: Path) -> dict:
    """lorafit.json if present (adapters written by peft have none)."""
    path = Path(directory) / LORAFIT_FILE
    if not path.is_file():
        return {}
    try:
        facts = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LorafitError(f"{path} is not valid JSON ({error}); delete it to load the adapter as plain LoRA") from error
    return facts if isinstance(facts, dict) else {}


# ---------------------------------------------------------------- loading


@dataclass
class ModulePlan:
    """How one module will be wrapped: checked against the model, nothing changed yet."""

    path: str
    module: nn.Module
    tensors: dict[str, torch.Tensor]  # "A" [R, d_in], "B" [d_out, R], and the variant's own parts
    variant: str
    rank: int  # per slice
    alpha: float  # ours: scaling = alpha/rank (or alpha/sqrt(rank))
    use_rslora: bool
    dropout: float
    slices: list[list[int]] | None
    unsliced: ModulePlan | None = None  # the same adapter as one LoRA on the whole module

    @property
    def a(self) -> torch.Tensor:
        return self.tensors["A"]

    @property
    def b(self) -> torch.Tensor:
        return self.tensors["B"]


def load_adapter(model: nn.Module, directory: Path) -> dict[str, LoRALayer]:
    """Wrap `model` per the adapter's config and load its weights; LorafitError (exit 2) if it does not fit."""
    plans = plan_adapter(model, directory)
    return freeze_and_wrap(model, {plan.path: _build_layer(plan) for plan in plans})


def check_adapter(model: nn.Module, directory: Path) -> None:
    """Raise LorafitError if the adapter does not fit `model` (which may live on the meta device)."""
    plan_adapter(model, directory)


def plan_adapter(model: nn.Module, directory: Path) -> list[ModulePlan]:
    """Check every tensor against the model before anything is modified, and decide how to wrap each module."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = read_adapter_weights(directory)
    facts = _read_facts(directory).get("modules")
    facts = facts if isinstance(facts, dict) else {}
    if lora_layers(model):
        raise LorafitError("the model already has LoRA layers; load an adapter into a plain base model")
    modules = dict(model.named_modules())
    variant = "dora" if config.get("use_dora") else "lora"
    table = model_targets(model)
    plans = []
    for path, (kind, tensors) in weights.items():
        module = _fitting_module(model, modules, path, kind, tensors)
        check_table(path, tensors.pop(TABLE, None), module.weight)
        check_parts(path, variant, is_embedding(module), tensors)
        rank, alpha = rank_and_alpha(config, path, tensors["A"].shape[0])
        _check_finite(directory, path, kind, tensors, alpha)
        plan = ModulePlan(
            path=path,
            module=module,
            tensors=tensors,
            variant=variant,
            rank=rank,
            alpha=float(alpha),
            use_rslora=bool(config.get("use_rslora", False)),
            dropout=float(config.get("lora_dropout", 0.0) or 0.0),
            slices=None,
        )
        check_selected(directory, config, path)
        plans.append(_sliced(getattr(model, "config", None), table, plan, facts.get(path)) or plan)
    return plans


def _check_finite(directory: Path, path: str, kind: str, tensors: dict[str, torch.Tensor], alpha) -> None:
    """A NaN or inf anywhere in a layer's tensors or its alpha would spread into every output of the model."""
    try:
        finite_alpha = math.isfinite(float(alpha))
    except (TypeError, ValueError):
        finite_alpha = False
    if not finite_alpha:
        raise LorafitError(f"{directory} gives {path} lora_alpha = {alpha!r}, not a finite number; fix {CONFIG_FILE}")
    for part, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise LorafitError(
                f"{directory} holds NaN or inf in {path}'s {TENSOR_NAMES.get((kind, part), part)}; the run that "
                "wrote it diverged, "
                "use the adapter of an earlier checkpoint"
            )


def _fitting_module(model: nn.Module, modules: dict[str, nn.Module], path: str, kind: str, tensors: dict):
    model_type = getattr(getattr(model, "config", None), "model_type", "this")
    module = modules.get(path)
    a, b = tensors["A"], tensors["B"]
    if module is None:
        raise LorafitError(
            f"adapter targets {path} which this {model_type} model does not have; "
            "was it trained for another architecture?"
        )
    expected = "embedding" if is_embedding(module) else "linear" if is_projection(module) else None
    if expected is None:
        raise LorafitError(f"adapter targets {path}, a {type(module).__name__}, neither a linear projection nor an embedding")
    if kind != expected:
        raise LorafitError(f"adapter holds {kind} LoRA weights for {path}, which is a {type(module).__name__}; re-save it")
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise LorafitError(
            f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} of {path} do not form a LoRA pair; re-save the adapter"
        )
    if kind == "embedding":
        d_out, d_in = module.embedding_dim, module.num_embeddings
    else:
        d_out, d_in = projection_shape(module, stores_transposed(module))
    for name, found, expected in (("d_in", a.shape[1], d_in), ("d_out", b.shape[0], d_out)):
        if found != expected:
            raise LorafitError(
                f"adapter for {name}={found} but base has {expected} at {path}; was it trained for another model size?"
            )
    return module


def _sliced(config, table: dict[str, Target], plan: ModulePlan, facts: dict | None) -> ModulePlan | None:
    """The plan as output slices when lorafit.json says so, this model's table agrees and B has the block shape.

    Sliced, resumed training keeps the k features of a fused projection frozen at zero; the output is the same.
    """
    if not isinstance(facts, dict) or not facts.get("slices") or not isinstance(facts.get("targets"), list):
        return None
    names = facts["targets"]
    if not all(name in table and matches_suffix(plan.path, table[name].module) for name in names):
        return None
    slices = list((fused_slices(config, names, table) or {}).values())
    if not slices or [len(s) for s in slices] != facts["slices"] or plan.a.shape[0] % len(slices):
        return None
    rank = plan.a.shape[0] // len(slices)
    if not is_block_structured(plan.b, slices, rank):
        return None  # trained further as a plain LoRA (by peft, say): k features are no longer zero
    alpha = lorafit_alpha(plan.alpha, len(slices), plan.use_rslora)
    return replace(plan, rank=rank, alpha=alpha, slices=slices, unsliced=plan)


def _build_layer(plan: ModulePlan) -> LoRALayer:
    """The plan's layer with its weights; a sliced DoRA layer whose other rows' magnitudes moved is built whole."""
    try:
        layer = _loaded_layer(plan)
    except ValueError:
        if plan.unsliced is None:
            raise
        layer = _loaded_layer(plan.unsliced)
    layer.train(plan.module.training)  # a new module starts in training mode; follow the module it wraps
    return layer


def _loaded_layer(plan: ModulePlan) -> LoRALayer:
    # A new layer draws a random A that is overwritten at once; keep the global RNG as it was (exact resume).
    device = plan.module.weight.device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        layer = lora_layer(plan.module, plan.rank, plan.alpha, plan.dropout, variant=plan.variant,
                           slices=plan.slices, use_rslora=plan.use_rslora)
    layer.load_saved_tensors({part: tensor.to(layer.lora_A.device) for part, tensor in plan.tensors.items()})
    return layer
