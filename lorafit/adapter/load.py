"""Load adapters in the PEFT LoRA format (lorafit's own or peft's), checked against the model before it changes.

Fused slices are rebuilt from `lorafit.json` where it says how a module was sliced; everything else loads as
a plain LoRA on the whole module. Weights are read from safetensors only, never pickles.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lorafit.adapter.convert import load_peft_tensors
from lorafit.adapter.format import (
    CONFIG_FILE,
    PICKLE_FILE,
    TABLE,
    TENSOR_NAMES,
    WEIGHTS_FILE,
    check_config,
    check_parts,
    check_selected,
    check_table,
    lora_tensors,
    lorafit_alpha,
    nested_paths,
    rank_and_alpha,
    selects_parameter,
)
from lorafit.adapter.save import LORAFIT_FILE
from lorafit.errors import LorafitError
from lorafit.lora.linear import is_block_structured, projection_shape
from lorafit.lora.variants import LoRALayer, for_module, from_peft_config
from lorafit.model.experts import Parameter
from lorafit.model.experts import stores_transposed as experts_transposed
from lorafit.model.inject import (
    freeze_and_wrap,
    is_embedding,
    is_projection,
    lora_layer,
    lora_layers,
    model_targets,
    nesting_order,
    stores_transposed,
)
from lorafit.model.load import meta_model
from lorafit.model.targets import Target, fused_slices, matches_suffix


def read_adapter_config(directory: Path) -> dict:
    """adapter_config.json of a PEFT LoRA adapter folder whose weights lorafit can load; clear errors otherwise."""
    config = read_config_file(directory)
    check_config(directory, config)
    _check_weights_file(directory)
    return config


def read_config_file(directory: Path) -> dict:
    """adapter_config.json as it is, whatever adapter it describes; clear errors when there is none to read."""
    directory = Path(directory)
    if not directory.exists():
        raise LorafitError(f"adapter folder {directory} does not exist; pass the adapter/ folder of a run")
    if not (directory / CONFIG_FILE).is_file():
        raise LorafitError(
            f"{directory} is not an adapter directory (no {CONFIG_FILE}); pass the adapter/ folder of a run"
        )
    try:
        config = json.loads((directory / CONFIG_FILE).read_text(), object_pairs_hook=_one_value_per_key)
    except (OSError, UnicodeDecodeError, ValueError) as error:  # JSONDecodeError is a ValueError
        raise LorafitError(f"{directory / CONFIG_FILE} is not valid JSON ({error}); re-save the adapter") from error
    if not isinstance(config, dict):
        raise LorafitError(f"{directory / CONFIG_FILE} is not a JSON object; re-save the adapter")
    return config


def _one_value_per_key(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object, refused when it gives a key twice (json keeps the last silently; other readers the first)."""
    keys = [key for key, _ in pairs]
    repeated = next((key for key in keys if keys.count(key) > 1), None)
    if repeated is not None:
        raise ValueError(f"key {repeated!r} is given twice")
    return dict(pairs)


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
    return lora_tensors(read_weights_file(directory), Path(directory) / WEIGHTS_FILE)


def read_weights_file(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of adapter_model.safetensors under its own key (a pickle is never read)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    _check_weights_file(directory)
    path = directory / WEIGHTS_FILE
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise LorafitError(f"{path} is not a readable safetensors file ({error}); re-save the adapter") from error
    for key, tensor in tensors.items():  # an integer or bool tensor would be cast to fp32 and load as other weights
        if not tensor.is_floating_point():
            raise LorafitError(f"{path} stores {key} as {str(tensor.dtype).removeprefix('torch.')}, not as floating "
                               "point numbers; re-save the adapter from its training run")
    return tensors


def read_facts(directory: Path) -> dict:
    """lorafit.json if present (adapters written by peft have none)."""
    path = Path(directory) / LORAFIT_FILE
    if not path.is_file():
        return {}
    try:
        facts = json.loads(path.read_text(), object_pairs_hook=_one_value_per_key)
    except (OSError, UnicodeDecodeError, ValueError) as error:  # JSONDecodeError is a ValueError
        raise LorafitError(f"{path} is not valid JSON ({error}); delete it to load the adapter as plain LoRA") from error
    return facts if isinstance(facts, dict) else {}


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
    parameter: str | None = None  # a weight parameter of `module` (target_parameters); `path` is then its path

    @property
    def a(self) -> torch.Tensor:
        return self.tensors["A"]

    @property
    def b(self) -> torch.Tensor:
        return self.tensors["B"]


def load_adapter(model: nn.Module, directory: Path) -> dict[str, LoRALayer]:
    """Wrap `model` per the adapter's config and load its weights; LorafitError (exit 2) if it does not fit."""
    plans = sorted(plan_adapter(model, directory), key=lambda plan: nesting_order(plan.module, plan.parameter))
    layers, wrapped = {}, {}  # wrapped: a module's path -> the layer around it so far (a parameter's layers nest)
    for plan in plans:
        around = plan.path.rpartition(".")[0] if plan.parameter else plan.path
        layers[plan.path] = wrapped[around] = _build_layer(plan, wrapped.get(around, plan.module))
    return freeze_and_wrap(model, layers)


def check_adapter(config, directory: Path) -> None:
    """Raise LorafitError if the adapter does not fit the model of `config`, built on the meta device: no weight
    is read, so a misfit is refused before the expensive work."""
    plan_adapter(meta_model(config), directory)


def plan_adapter(model: nn.Module, directory: Path) -> list[ModulePlan]:
    """Check every tensor against the model before anything is modified, and decide how to wrap each module."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = read_adapter_weights(directory)
    facts = read_facts(directory).get("modules")
    facts = facts if isinstance(facts, dict) else {}
    if lora_layers(model):
        raise LorafitError("the model already has LoRA layers; load an adapter into a plain base model")
    modules = dict(model.named_modules())
    variant = from_peft_config(config)
    table = model_targets(model)
    parameters = _selected_parameters(model, config)
    plans = []
    for path, (kind, tensors) in weights.items():
        if path in parameters:
            plans.append(_parameter_plan(directory, config, variant.name, parameters[path], kind, tensors))
            continue
        module = _fitting_module(model, modules, path, kind, tensors)
        check_table(path, tensors.pop(TABLE, None), module.weight)
        check_parts(path, for_module(variant, "embedding" if is_embedding(module) else "linear"), tensors, config)
        rank, alpha = rank_and_alpha(config, path, tensors["A"].shape[0])
        _check_finite(directory, path, kind, tensors, alpha)
        plan = ModulePlan(
            path=path,
            module=module,
            tensors=tensors,
            variant=variant.name,
            rank=rank,
            alpha=float(alpha),
            use_rslora=bool(config.get("use_rslora", False)),
            dropout=float(config.get("lora_dropout", 0.0) or 0.0),
            slices=None,
        )
        check_selected(directory, config, path)
        plans.append(_sliced(getattr(model, "config", None), table, plan, facts.get(path)) or plan)
    return plans


def _selected_parameters(model: nn.Module, config: dict) -> dict[str, Parameter]:
    """The parameters target_parameters selects, by the module path peft names their tensors by."""
    found = {}
    for path, module in model.named_modules():
        names = [name for name, _ in module.named_parameters(recurse=False) if selects_parameter(config, f"{path}.{name}")]
        found.update({peft: Parameter(path, module, name) for name, peft in nested_paths(path, names).items()})
    return found


def _parameter_plan(directory: Path, config: dict, variant: str, parameter: Parameter, kind: str,
                    tensors: dict[str, torch.Tensor]) -> ModulePlan:
    """A weight parameter's plan: A [experts·r, d_in] and B [d_out, r·experts], checked against the parameter."""
    check_parts(parameter.full, for_module(from_peft_config(config), "parameter"), tensors, config)
    weight = getattr(parameter.module, parameter.name)
    experts = weight.shape[0] if weight.ndim == 3 else 1
    first, second = weight.shape[-2:]
    d_out, d_in = (second, first) if experts_transposed(parameter.module) else (first, second)
    a, b = tensors["A"], tensors["B"]
    fits = (kind == "linear" and weight.ndim in (2, 3) and a.ndim == b.ndim == 2 and a.shape[0] % experts == 0
            and a.shape[0] == b.shape[1] and (a.shape[1], b.shape[0]) == (d_in, d_out))
    if not fits:
        raise LorafitError(
            f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} of {parameter.full} do not fit its "
            f"{experts} experts of {d_out} x {d_in}; was the adapter trained for another model?"
        )
    rank, alpha = rank_and_alpha(config, parameter.full, a.shape[0] // experts)
    _check_finite(directory, parameter.full, kind, tensors, alpha)
    return ModulePlan(path=parameter.full, module=parameter.module, tensors=tensors, variant=variant, rank=rank,
                      alpha=float(alpha), use_rslora=bool(config.get("use_rslora", False)), dropout=0.0, slices=None,
                      parameter=parameter.name)


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


def _build_layer(plan: ModulePlan, module: nn.Module) -> LoRALayer:
    """The plan's layer around `module` (the plan's, or a layer around it) with its weights; a sliced DoRA layer
    whose other rows' magnitudes moved is built whole."""
    try:
        layer = _loaded_layer(plan, module)
    except ValueError:
        if plan.unsliced is None:
            raise
        layer = _loaded_layer(plan.unsliced, module)
    layer.train(plan.module.training)  # a new module starts in training mode; follow the module it wraps
    return layer


def _loaded_layer(plan: ModulePlan, module: nn.Module) -> LoRALayer:
    # A new layer draws a random A that is overwritten at once; keep the global RNG as it was (exact resume).
    device = next(plan.module.parameters()).device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    options = {"slices": plan.slices} if plan.parameter is None else {
        "parameter": plan.parameter, "transposed": experts_transposed(plan.module)}
    with torch.random.fork_rng(devices=cuda):
        layer = lora_layer(module, plan.rank, plan.alpha, plan.dropout, variant=plan.variant,
                           use_rslora=plan.use_rslora, **options)
    load_peft_tensors(layer, {part: tensor.to(layer.lora_A.device) for part, tensor in plan.tensors.items()})
    return layer
