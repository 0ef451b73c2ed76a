"""The PEFT LoRA format as data: file and key names, config checks, rank and alpha patterns, alpha translation.

Pure translation between peft's adapter_config.json and state-dict keys and lorafit's per-module facts;
nothing here reads files or touches a model, so it is tested on plain dicts, strings and tensors.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.lora.linear import lora_scaling
from lorafit.lora.variants import VARIANTS, Variant
from lorafit.model.targets import matches_suffix

CONFIG_FILE = "adapter_config.json"


WEIGHTS_FILE = "adapter_model.safetensors"


PICKLE_FILE = "adapter_model.bin"


KEY_PREFIX = "base_model.model."


# The tensors a layer saves, by lorafit's name for them and the layer's kind, and peft's name after the module
# path: base_model.model.<module path>.<peft name>. A variant's own tensors (DoRA's magnitude) come from its
# registry entry.
TENSOR_NAMES = {
    ("linear", "A"): "lora_A.weight",
    ("linear", "B"): "lora_B.weight",
    ("embedding", "A"): "lora_embedding_A",
    ("embedding", "B"): "lora_embedding_B",
    **{("linear", part): name for variant in VARIANTS.values() for part, name in variant.peft_tensors.items()},
}


# peft saves a targeted embedding's whole table too ("base_layer"): read as part "table", to compare with the base.
TABLE = "table"


_NAMES = "|".join(sorted({name.split(".")[0] for name in TENSOR_NAMES.values()} | {"base_layer"}))


# peft's names as read: the adapter name ("default") may sit before the end, and .weight may follow.
KEY_PATTERN = re.compile(rf"^(?:base_model\.model\.)?(?P<path>.+)\.(?P<name>{_NAMES})(?:\.(?!weight$)[^.]+)?(?:\.weight)?$")


# Config switches for features whose weights or forward pass lorafit's layers cannot reproduce.
UNSUPPORTED = (
    "lora_bias",
    "modules_to_save",
    "trainable_token_indices",
    "layer_replication",
    "alora_invocation_tokens",
    "use_qalora", "use_bdlora",
    "megatron_config",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "layers_to_transform",  # peft would adapt only those layers, whatever the file holds
)


# Initialisations that leave the base weights alone; pissa, olora, corda, loftq... change them.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def weight_key(path: str, part: str, kind: str = "linear") -> str:
    """The state-dict key peft saves for tensor `part` ("A", "B", "magnitude") of a `kind` layer at `path`."""
    return f"{KEY_PREFIX}{path}.{TENSOR_NAMES[kind, part]}"


def _part_of(name: str) -> tuple[str | None, str]:
    """(kind or None when any kind has it, part) for one of peft's tensor names."""
    kind, part = next(key for key, peft_name in TENSOR_NAMES.items() if peft_name.split(".")[0] == name)
    return (kind if part in ("A", "B") else None), part


def lora_tensors(tensors: dict[str, torch.Tensor], source: Path) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    """{module path: (kind, {"A": [R, d_in], "B": [d_out, R], maybe "magnitude": [d_out]})} in fp32, from `source`."""
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    kinds: dict[str, set[str]] = defaultdict(set)
    for key, tensor in tensors.items():
        match = KEY_PATTERN.match(key)
        if match is None:
            raise LorafitError(
                f"{source} holds {key}, which is not a LoRA A or B matrix or DoRA magnitude (biases or saved modules "
                "are not supported); lorafit reads LoRA and DoRA adapters"
            )
        kind, part = (None, TABLE) if match["name"] == "base_layer" else _part_of(match["name"])
        parts[match["path"]][part] = tensor.float()
        kinds[match["path"]].update([kind] if kind else [])
    if not parts:
        raise LorafitError(f"{source} holds no LoRA weights; pass a trained adapter")
    layers = {}
    for module, found in parts.items():
        if not {"A", "B"} <= set(found):
            missing = "lora_B" if "A" in found else "lora_A"
            raise LorafitError(f"{source} has no {missing} for {module}; the adapter is incomplete, re-save it")
        if len(kinds[module]) != 1:
            raise LorafitError(f"{source} mixes linear and embedding LoRA weights for {module}; re-save the adapter")
        layers[module] = (kinds[module].pop(), found)
    return layers


def peft_alpha(alpha: float, rank: int, n_slices: int, *, use_rslora: bool, peft_rslora: bool) -> float:
    """The lora_alpha that makes peft's scaling, alpha/R or alpha/sqrt(R) with R = n_slices·r, equal ours."""
    if use_rslora == peft_rslora:
        # alpha/r = (n·alpha)/(n·r);  alpha/sqrt(r) = (sqrt(n)·alpha)/sqrt(n·r)
        return alpha * (math.sqrt(n_slices) if use_rslora else n_slices)
    stacked = n_slices * rank
    return lora_scaling(alpha, rank, use_rslora) * (math.sqrt(stacked) if peft_rslora else stacked)


def lorafit_alpha(alpha: float, n_slices: int, use_rslora: bool) -> float:
    """Inverse of peft_alpha (same rsLoRA switch on both sides): the per-slice alpha of n_slices slices."""
    return alpha / (math.sqrt(n_slices) if use_rslora else n_slices)


def adapter_config(
    values: dict[str, tuple[int, float]],
    suffixes: dict[str, str],
    *,
    parameters: dict[str, str] | None = None,
    base_model: str,
    use_rslora: bool,
    fan_in_fan_out: bool,
    dropout: float,
    flags: dict | None = None,
) -> dict:
    """adapter_config.json for modules and weight parameters with peft's (rank, alpha) `values`, the modules selected
    by `suffixes` (target_modules), the parameters by `parameters` (target_parameters, suffixes of their paths);
    `flags` are the variant's own (DoRA's use_dora)."""
    parameters = parameters or {}
    (rank, alpha), rank_pattern, alpha_pattern = rank_patterns(values, {**suffixes, **parameters})
    chosen = {"target_parameters": sorted(set(parameters.values()))} if parameters else {}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": _number(alpha),
        "target_modules": sorted(set(suffixes.values())),
        "rank_pattern": rank_pattern,
        "alpha_pattern": {key: _number(value) for key, value in alpha_pattern.items()},
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": dropout,
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    } | chosen | (flags or {})


def selecting_suffixes(module_paths: Iterable[str], wrapped: list[str]) -> dict[str, str]:
    """For each wrapped module, the shortest dotted suffix of its path that selects wrapped modules only.

    peft selects a module when its path equals a target_modules entry or ends with "." + entry, so GPT-2's
    attention output must be written "attn.c_proj": a bare "c_proj" would also wrap mlp.c_proj.
    """
    chosen = set(wrapped)
    selected_by: dict[str, set[str]] = defaultdict(set)
    for path in module_paths:
        parts = path.split(".")
        if not path or any(".".join(parts[:i]) in chosen for i in range(1, len(parts))):
            continue  # the inside of a LoRALinear is not part of the model peft sees
        for i in range(len(parts)):
            selected_by[".".join(parts[i:])].add(path)
    suffixes = {}
    for path in wrapped:
        parts = path.split(".")
        candidates = (".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1))
        suffixes[path] = next((s for s in candidates if selected_by[s] <= chosen), path)
    return suffixes


def rank_patterns(
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


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def check_config(directory: Path, config: dict) -> None:
    """LorafitError unless `config` (from `directory`) describes a plain LoRA whose weights lorafit reproduces."""
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
    check_values(Path(directory) / CONFIG_FILE, config)


def check_values(file: Path, config: dict) -> None:
    """LorafitError unless r, lora_alpha, target_modules and the patterns have the types peft writes."""
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise LorafitError(f"{file} has r={rank!r}; it must be a positive integer")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise LorafitError(f"{file} has a {key} that is not an object; fix it")
    alphas = [config.get("lora_alpha", 8), *(config.get("alpha_pattern") or {}).values()]
    if not all(isinstance(alpha, (int, float)) and not isinstance(alpha, bool) for alpha in alphas):
        raise LorafitError(f"{file} has a non-numeric lora_alpha; fix it")
    if min(alphas) <= 0:  # the scaling alpha/r would switch the update off or turn it around
        raise LorafitError(f"{file} has lora_alpha = {min(alphas)!r}; it must be positive, as the adapter was trained")
    parameters = config.get("target_parameters")
    if parameters is not None and not (isinstance(parameters, list) and all(isinstance(p, str) for p in parameters)):
        raise LorafitError(f"{file} has a target_parameters that is not a list of names; fix it")
    if not isinstance(config.get("target_modules"), (str, list)) and not parameters:
        raise LorafitError(f"{file} names no target_modules; it is not a LoRA adapter for modules")


def rank_and_alpha(config: dict, path: str, found_rank: int) -> tuple[int, float]:
    """peft's rank and alpha for one module: a rank_pattern/alpha_pattern entry, else r and lora_alpha."""
    rank = pattern_value(config.get("rank_pattern") or {}, path, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
    if rank != found_rank:
        raise LorafitError(
            f"{path} has rank {found_rank} in {WEIGHTS_FILE} but {rank} in {CONFIG_FILE}; the adapter is inconsistent"
        )
    return rank, alpha


def pattern_value(patterns: dict, path: str, default):
    """peft's lookup: the first key that, as a regex, matches a dotted suffix of the module path."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        except re.error as error:
            raise LorafitError(f"pattern {key!r} in {CONFIG_FILE} is not a valid regex ({error})") from error
    return default


def check_parts(path: str, variant: Variant, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """A module has exactly its variant's own tensors beside A and B (a DoRA adapter a magnitude for every linear
    layer, one value per output row), as the adapter config's flags say."""
    d_out = tensors["B"].shape[0]
    for owner in VARIANTS.values():
        for part, name in owner.peft_tensors.items():
            wanted = part in variant.peft_tensors
            if wanted != (part in tensors):
                says = ", ".join(f"{key}={config.get(key, False)}" for key in owner.peft_flags)
                raise LorafitError(f"{path} {'lacks' if wanted else 'has'} a {name} but the adapter config says "
                                   f"{says}; re-save the adapter")
            if wanted and tuple(tensors[part].shape) != (d_out,):
                raise LorafitError(f"{name} of {path} has shape {tuple(tensors[part].shape)}, expected ({d_out},); "
                                   "re-save the adapter")


def check_table(path: str, table: torch.Tensor | None, weight: torch.Tensor) -> None:
    """An embedding table saved beside the adapter (peft does) must be the base's own: we never replace it."""
    if table is None or weight.is_meta:
        return
    if table.shape != weight.shape or not torch.equal(table, weight.detach().float()):
        raise LorafitError(
            f"the adapter carries its own {path} table, which differs from this base's (a resized vocabulary?); "
            "lorafit loads adapters onto the base's own tables only"
        )


def selects_parameter(config: dict, key: str) -> bool:
    """peft's rule for target_parameters: a parameter is selected by its whole path or a dotted suffix of it."""
    return any(matches_suffix(key, target) for target in config.get("target_parameters") or [])


def nested_paths(module: str, parameters: list[str]) -> dict[str, str]:
    """The module path peft names the tensors of each adapted parameter of one module by: it nests one wrapper per
    parameter, the first (in the module's registration order) innermost, each wrapper's inside named base_layer."""
    return {name: module + ".base_layer" * (len(parameters) - 1 - i) for i, name in enumerate(parameters)}


# peft (0.18 on) under transformers 5 reads an adapter for a mixture-of-experts family whose checkpoints transformers
# converts as one trained on transformers 4, whose experts were modules: it moves these target_modules names to
# target_parameters (the stacks they became), whichever module they name (peft/utils/transformers_weight_conversion.py,
# _convert_peft_config_moe). A LoRA on a dense MLP or shared expert so named then does not load in peft.
PEFT_MOE_RENAMES = {"qwen2_moe": ("gate", "gate_proj", "up_proj", "down_proj"), "mixtral": ("gate", "w1", "w2", "w3")}


def peft_notes(model_type: str, keys: list[str]) -> list[str]:
    """A line when peft would take some of the adapted modules (`keys`: layer paths) of a `model_type` model for
    experts and not load their LoRA; none otherwise."""
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as patterns
    except ImportError:  # a transformers without checkpoint conversions: peft converts nothing either
        return []
    names = PEFT_MOE_RENAMES.get(patterns.get(model_type) or ("mixtral" if model_type == "mixtral" else ""), ())
    renamed = [key for key in keys if key.rsplit(".", 1)[-1] in names]
    if not renamed:
        return []
    shown = sorted({key.rsplit(".", 1)[-1] for key in renamed})
    return [f"peft reads target_modules {', '.join(shown)} of a {model_type} model as the names of its experts (from "
            f"transformers 4) and moves them to the experts' stacks, so the LoRA on {renamed[0]} and "
            f"{len(renamed) - 1} more modules so named loads in lorafit but not in peft; leave them out of the "
            "targets for an adapter that peft loads whole"]


def check_selected(directory: Path, config: dict, path: str) -> None:
    """Weights for a module that target_modules does not select would be ignored by peft: refuse them."""
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        try:
            selected = targets == "all-linear" or re.fullmatch(targets, path) is not None
        except re.error as error:
            raise LorafitError(f"target_modules {targets!r} in {CONFIG_FILE} is not a valid regex ({error})") from error
    else:
        selected = any(matches_suffix(path, t) for t in targets)
    if not selected:
        raise LorafitError(
            f"{Path(directory) / CONFIG_FILE} target_modules does not select {path}, which has weights; "
            "fix target_modules"
        )
