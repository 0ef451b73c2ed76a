"""Save and load adapters in the PEFT LoRA format, so peft and lorafit read each other's adapters.

A folder holds `adapter_config.json` and `adapter_model.safetensors` exactly as peft writes them, plus
`lorafit.json` with what only lorafit needs (semantic targets, which modules were sliced, the recipe).
A q/v adapter on a fused projection is stored as one LoRA of rank n·r on the whole module: A stacks the
slices' A over each other, B is block-structured with zero rows for k, and alpha is scaled so peft's
alpha/R (or alpha/sqrt(R) under rsLoRA) equals ours. Weights are read from safetensors only, never pickles.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lorafit import __version__
from lorafit.errors import LorafitError
from lorafit.inject import is_projection, lora_layers, replace_module, stores_transposed
from lorafit.lora import LoRALinear
from lorafit.storage import staged_dir
from lorafit.targets import architecture

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
LORAFIT_FILE = "lorafit.json"
KEY_PREFIX = "base_model.model."
# peft keys: base_model.model.<module path>.lora_A.weight, or with the adapter name before .weight.
KEY_PATTERN = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
# Config switches for features whose weights or forward pass a plain LoRALinear cannot reproduce.
UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "megatron_config",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
)
# Initialisations that leave the base weights alone; pissa, olora, corda, loftq... change them.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


# ---------------------------------------------------------------- saving


def save_adapter(
    model: nn.Module, directory: Path, *, base_model: str, targets: list[str], extra: dict | None = None
) -> int:
    """Write adapter_config.json, adapter_model.safetensors and lorafit.json atomically.

    Returns the size in bytes of the safetensors file written."""
    from safetensors.torch import save

    layers = lora_layers(model)
    if not layers:
        raise LorafitError("the model has no LoRA layers to save; inject or load an adapter first")
    directory = Path(directory)
    # Everything is serialised before anything is written, so a bad value cannot leave half an adapter.
    contents = {
        WEIGHTS_FILE: save(adapter_tensors(layers), metadata={"format": "pt"}),
        CONFIG_FILE: _json_bytes(peft_config(model, layers, base_model)),
        LORAFIT_FILE: _json_bytes(lorafit_facts(model, layers, targets, extra)),
    }
    _write_files(directory, contents)
    return len(contents[WEIGHTS_FILE])


def adapter_tensors(layers: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """peft's state dict: every layer as a plain LoRA of rank n_slices·r on its whole module, in fp32."""
    tensors = {}
    for path, layer in layers.items():
        a, b = layer.peft_weights()
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = a.to("cpu", torch.float32).contiguous().clone()
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = b.to("cpu", torch.float32).contiguous().clone()
    return tensors


def stacked_rank(layer: LoRALinear) -> int:
    return layer.lora_A.shape[0]


def peft_alpha(layer: LoRALinear, use_rslora: bool) -> float:
    """The lora_alpha that makes peft's scaling, alpha/R or alpha/sqrt(R) with R = n_slices·r, equal ours."""
    n_slices = len(layer.slice_sizes)
    if layer.use_rslora == use_rslora:
        # alpha/r = (n·alpha)/(n·r);  alpha/sqrt(r) = (sqrt(n)·alpha)/sqrt(n·r)
        return layer.alpha * (math.sqrt(n_slices) if use_rslora else n_slices)
    rank = stacked_rank(layer)
    return layer.scaling * (math.sqrt(rank) if use_rslora else rank)


def peft_config(model: nn.Module, layers: dict[str, LoRALinear], base_model: str) -> dict:
    """adapter_config.json: one rank and alpha for most modules, rank_pattern/alpha_pattern for the rest."""
    use_rslora = all(layer.use_rslora for layer in layers.values())
    suffixes = selecting_suffixes(model, list(layers))
    values = {path: (stacked_rank(layer), peft_alpha(layer, use_rslora)) for path, layer in layers.items()}
    (rank, alpha), rank_pattern, alpha_pattern = _rank_patterns(values, suffixes)
    first = next(iter(layers.values()))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": _number(alpha),
        "target_modules": sorted(set(suffixes.values())),
        "rank_pattern": rank_pattern,
        "alpha_pattern": {key: _number(value) for key, value in alpha_pattern.items()},
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "lora_dropout": getattr(first.dropout, "p", 0.0),
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def selecting_suffixes(model: nn.Module, paths: list[str]) -> dict[str, str]:
    """For each wrapped module, the shortest dotted suffix of its path that selects wrapped modules only.

    peft selects a module when its path equals a target_modules entry or ends with "." + entry, so GPT-2's
    attention output must be written "attn.c_proj": a bare "c_proj" would also wrap mlp.c_proj.
    """
    wrapped = set(paths)
    selected_by: dict[str, set[str]] = defaultdict(set)
    for path, _ in model.named_modules():
        parts = path.split(".")
        if not path or any(".".join(parts[:i]) in wrapped for i in range(1, len(parts))):
            continue  # the inside of a LoRALinear is not part of the model peft sees
        for i in range(len(parts)):
            selected_by[".".join(parts[i:])].add(path)
    suffixes = {}
    for path in paths:
        parts = path.split(".")
        candidates = (".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1))
        suffixes[path] = next((s for s in candidates if selected_by[s] <= wrapped), path)
    return suffixes


def _rank_patterns(
    values: dict[str, tuple[int, float]], suffixes: dict[str, str]
) -> tuple[tuple[int, float], dict[str, int], dict[str, float]]:
    """The most common (rank, alpha) as the default, and patterns (peft regexes) for modules that differ."""
    default = Counter(values.values()).most_common(1)[0][0]
    groups: dict[str, list[str]] = defaultdict(list)
    for path, suffix in suffixes.items():
        groups[suffix].append(path)
    rank_pattern, alpha_pattern = {}, {}
    for suffix, paths in groups.items():
        shared = {values[path] for path in paths}
        # One key per suffix where its modules agree, else one anchored full path per module.
        keys = [(suffix, values[paths[0]])] if len(shared) == 1 else [(re.escape(p), values[p]) for p in paths]
        for key, (rank, alpha) in keys:
            if rank != default[0]:
                rank_pattern[key] = rank
            if alpha != default[1]:
                alpha_pattern[key] = alpha
    return default, rank_pattern, alpha_pattern


def lorafit_facts(model: nn.Module, layers: dict[str, LoRALinear], targets: list[str], extra: dict | None) -> dict:
    """lorafit.json: what peft's format cannot say — the targets asked for and which modules were sliced."""
    return {
        "lorafit_version": __version__,
        "model_type": getattr(model.config, "model_type", None),
        "targets": list(targets),
        "modules": {path: _module_facts(model.config, path, layer, targets) for path, layer in layers.items()},
        "extra": extra or {},
    }


def _module_facts(config, path: str, layer: LoRALinear, targets: list[str]) -> dict:
    sliced = layer.rows is not None
    return {
        "rank": layer.rank,
        "alpha": layer.alpha,
        "use_rslora": layer.use_rslora,
        "slices": list(layer.slice_sizes) if sliced else None,
        "targets": _slice_targets(config, path, layer, targets) if sliced else None,
    }


def _slice_targets(config, path: str, layer: LoRALinear, targets: list[str]) -> list[str] | None:
    """The semantic targets whose rows make up this layer's slices, or None if the table does not explain them."""
    table = architecture(config.model_type)
    names = [t for t in dict.fromkeys(targets) if t in table and table[t].rows and _ends_with(path, table[t].module)]
    rows = _target_rows(config, names)
    if rows is None or [r for slice_rows in rows for r in slice_rows] != layer.rows.tolist():
        return None
    return sorted(names, key=lambda name: min(table[name].rows(config)))


def _target_rows(config, names: list[str]) -> list[list[int]] | None:
    """Output rows of each fused-projection target, in row order (as find_sites orders slices)."""
    table = architecture(config.model_type)
    if not names or any(name not in table or table[name].rows is None for name in names):
        return None
    return sorted((table[name].rows(config) for name in names), key=min)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, default=str) + "\n").encode()


def _write_files(directory: Path, contents: dict[str, bytes]) -> None:
    """Build the whole adapter folder under a temporary name and swap it in: old adapter or new, never a mix."""
    if directory.exists() and not directory.is_dir():
        raise LorafitError(f"{directory} exists and is not a folder; choose another adapter folder")
    with staged_dir(directory) as staging:
        for name, data in contents.items():
            (staging / name).write_bytes(data)


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
    _check_config(directory, config)
    _check_weights_file(directory)
    return config


def _check_config(directory: Path, config: dict) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise LorafitError(f"{directory} holds a {peft_type or 'untyped'} adapter; lorafit reads LoRA adapters only")
    for key in UNSUPPORTED:
        if config.get(key):
            raise LorafitError(f"{directory} uses {key}, which lorafit does not support; it reads plain LoRA adapters")
    if config.get("bias", "none") not in ("none", None):
        raise LorafitError(f"{directory} trains biases (bias={config['bias']!r}); lorafit reads adapters with bias='none'")
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        raise LorafitError(
            f"{directory} was initialised with {config['init_lora_weights']!r}, which changes the base weights; "
            "convert it to a plain LoRA adapter with peft first"
        )
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise LorafitError(f"{directory / CONFIG_FILE} has r={rank!r}; it must be a positive integer")
    if not isinstance(config.get("lora_alpha", 8), (int, float)):
        raise LorafitError(f"{directory / CONFIG_FILE} has a non-numeric lora_alpha; fix it")
    if not isinstance(config.get("target_modules"), (str, list)):
        raise LorafitError(f"{directory / CONFIG_FILE} names no target_modules; it is not a LoRA adapter for modules")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise LorafitError(f"{directory / CONFIG_FILE} has a {key} that is not an object; fix it")


def _check_weights_file(directory: Path) -> None:
    if (directory / WEIGHTS_FILE).is_file():
        return
    if (directory / PICKLE_FILE).exists():
        raise LorafitError(
            f"{directory} has only {PICKLE_FILE}, a pickle that lorafit never loads; convert it to {WEIGHTS_FILE} "
            "(load it with peft and save_pretrained(..., safe_serialization=True))"
        )
    raise LorafitError(f"{directory} has no {WEIGHTS_FILE}; pass a complete adapter folder")


def read_adapter_weights(directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A [R, d_in], B [d_out, R])} from adapter_model.safetensors, in fp32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_FILE
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise LorafitError(f"{path} is not a readable safetensors file ({error}); re-save the adapter") from error
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        match = KEY_PATTERN.match(key)
        if match is None:
            raise LorafitError(
                f"{path} holds {key}, which is not a LoRA A or B matrix (DoRA magnitudes, biases or saved modules "
                "are not supported); lorafit reads plain LoRA adapters"
            )
        parts[match["path"]][match["part"]] = tensor.float()
    if not parts:
        raise LorafitError(f"{path} holds no LoRA weights; pass a trained adapter")
    weights = {}
    for module, pair in parts.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise LorafitError(f"{path} has no {missing} for {module}; the adapter is incomplete, re-save it")
        weights[module] = (pair["A"], pair["B"])
    return weights


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
    a: torch.Tensor
    b: torch.Tensor
    rank: int  # per slice
    alpha: float  # ours: scaling = alpha/rank (or alpha/sqrt(rank))
    use_rslora: bool
    dropout: float
    slices: list[list[int]] | None


def load_adapter(model: nn.Module, directory: Path) -> dict[str, LoRALinear]:
    """Wrap `model` per the adapter's config and load its weights; LorafitError (exit 2) if it does not fit."""
    plans = plan_adapter(model, directory)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    layers = {}
    for plan in plans:
        layer = _build_layer(plan)
        replace_module(model, plan.path, layer)
        layers[plan.path] = layer
    return layers


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
    plans = []
    for path, (a, b) in weights.items():
        module = _fitting_module(model, modules, path, a, b)
        rank, alpha = _rank_and_alpha(config, path, a.shape[0])
        plan = ModulePlan(
            path=path,
            module=module,
            a=a,
            b=b,
            rank=rank,
            alpha=float(alpha),
            use_rslora=bool(config.get("use_rslora", False)),
            dropout=float(config.get("lora_dropout", 0.0) or 0.0),
            slices=None,
        )
        _check_selected(directory, config, path)
        plans.append(_sliced(getattr(model, "config", None), plan, facts.get(path)) or plan)
    return plans


def _fitting_module(model: nn.Module, modules: dict[str, nn.Module], path: str, a: torch.Tensor, b: torch.Tensor):
    model_type = getattr(getattr(model, "config", None), "model_type", "this")
    module = modules.get(path)
    if module is None:
        raise LorafitError(
            f"adapter targets {path} which this {model_type} model does not have; "
            "was it trained for another architecture?"
        )
    if not is_projection(module):
        raise LorafitError(f"adapter targets {path}, a {type(module).__name__} and not a linear projection")
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise LorafitError(
            f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} of {path} do not form a LoRA pair; re-save the adapter"
        )
    rows, cols = module.weight.shape
    d_out, d_in = (cols, rows) if stores_transposed(module) else (rows, cols)
    for name, found, expected in (("d_in", a.shape[1], d_in), ("d_out", b.shape[0], d_out)):
        if found != expected:
            raise LorafitError(
                f"adapter for {name}={found} but base has {expected} at {path}; was it trained for another model size?"
            )
    return module


def _rank_and_alpha(config: dict, path: str, found_rank: int) -> tuple[int, float]:
    """peft's rank and alpha for one module: a rank_pattern/alpha_pattern entry, else r and lora_alpha."""
    rank = _pattern_value(config.get("rank_pattern") or {}, path, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
    if rank != found_rank:
        raise LorafitError(
            f"{path} has rank {found_rank} in {WEIGHTS_FILE} but {rank} in {CONFIG_FILE}; the adapter is inconsistent"
        )
    return rank, alpha


def _pattern_value(patterns: dict, path: str, default):
    """peft's lookup: the first key that, as a regex, matches a dotted suffix of the module path."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        except re.error as error:
            raise LorafitError(f"pattern {key!r} in {CONFIG_FILE} is not a valid regex ({error})") from error
    return default


def _check_selected(directory: Path, config: dict, path: str) -> None:
    """Weights for a module that target_modules does not select would be ignored by peft: refuse them."""
    targets = config["target_modules"]
    if isinstance(targets, str):
        try:
            selected = targets == "all-linear" or re.fullmatch(targets, path) is not None
        except re.error as error:
            raise LorafitError(f"target_modules {targets!r} in {CONFIG_FILE} is not a valid regex ({error})") from error
    else:
        selected = any(path == t or _ends_with(path, t) for t in targets)
    if not selected:
        raise LorafitError(
            f"{directory / CONFIG_FILE} target_modules does not select {path}, which has weights; fix target_modules"
        )


def _ends_with(path: str, suffix: str) -> bool:
    return path == suffix or path.endswith("." + suffix)


def _sliced(config, plan: ModulePlan, facts: dict | None) -> ModulePlan | None:
    """The plan as output slices when lorafit.json says so, this model's table agrees and B has the block shape.

    Sliced, resumed training keeps the k rows of a fused projection frozen at zero; the output is the same.
    """
    if not isinstance(facts, dict) or not facts.get("slices") or not isinstance(facts.get("targets"), list):
        return None
    table = architecture(getattr(config, "model_type", ""))
    names = facts["targets"]
    if not all(name in table and _ends_with(plan.path, table[name].module) for name in names):
        return None
    slices = _target_rows(config, names)
    if slices is None or [len(s) for s in slices] != facts["slices"] or plan.a.shape[0] % len(slices):
        return None
    rank = plan.a.shape[0] // len(slices)
    if not _is_block_structured(plan.b, slices, rank):
        return None  # trained further as a plain LoRA (by peft, say): k rows are no longer zero
    n = len(slices)
    # Inverse of peft_alpha: the per-slice alpha whose scaling equals peft's alpha/R (or alpha/sqrt(R)).
    alpha = plan.alpha / (math.sqrt(n) if plan.use_rslora else n)
    return replace(plan, rank=rank, alpha=alpha, slices=slices)


def _is_block_structured(b: torch.Tensor, slices: list[list[int]], rank: int) -> bool:
    """True when B is zero everywhere except slice i's rows in columns [i·r, (i+1)·r)."""
    inside = torch.zeros_like(b, dtype=torch.bool)
    for i, rows in enumerate(slices):
        inside[torch.tensor(rows), i * rank : (i + 1) * rank] = True
    return not b[~inside].any()


def _build_layer(plan: ModulePlan) -> LoRALinear:
    # LoRALinear draws a random A that is overwritten at once; keep the global RNG as it was (exact resume).
    device = plan.module.weight.device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        layer = LoRALinear(
            plan.module,
            plan.rank,
            plan.alpha,
            plan.dropout,
            slices=plan.slices,
            fan_in_fan_out=stores_transposed(plan.module),
            use_rslora=plan.use_rslora,
        )
    layer.load_peft_weights(plan.a.to(layer.lora_A.device), plan.b.to(layer.lora_A.device))
    layer.train(plan.module.training)  # a new module starts in training mode; follow the module it wraps
    return layer
