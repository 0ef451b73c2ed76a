"""`lorafit export`: check an adapter against a serving engine's rules and write what that engine loads.

The adapter is read from its files (adapter_config.json, adapter_model.safetensors, lorafit.json, the chat
template), whoever wrote it. Each engine's rules live in `lorafit.adapter.engines`; this module reads, decides
and writes: the PEFT folder with every module's scaling folded into lora_B where the engine reads one alpha,
a GGUF file for llama.cpp (`lorafit.adapter.gguf`), or the merged model where no adapter form can work.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorafit.adapter.engines import ADAPTER_FORM, ENGINES, FIXED, MERGE, REFUSE, Engine, Problem, check, scaling_folds
from lorafit.adapter.format import (
    CONFIG_FILE,
    KEY_PATTERN,
    WEIGHTS_FILE,
    check_values,
    lora_tensors,
    rank_and_alpha,
    weight_key,
)
from lorafit.adapter.load import read_config_file, read_facts, read_weights_file
from lorafit.adapter.serving import chat_files, serve_hint
from lorafit.errors import LorafitError
from lorafit.lora.linear import lora_scaling
from lorafit.storage import json_text, staged_dir, write_atomic

# SGLang's names for the projections it stacks (lora/utils.py, get_normalized_target_modules)
STACKED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
           "up_proj": "gate_up_proj"}


@dataclass
class Adapter:
    """An adapter folder as the engines see it, and what is known of its base model."""

    directory: Path
    config: dict
    modules: dict[str, tuple[str, dict[str, torch.Tensor]]]  # path -> (kind, {"A", "B", maybe "magnitude"/"table"})
    extra: list[str]  # tensors that are not LoRA pairs: biases, saved modules
    facts: dict = field(default_factory=dict)  # lorafit.json
    base: object | None = None  # the base's transformers config (text part), when known
    base_name: str | None = None  # --base

    @property
    def kinds(self) -> dict[str, str]:
        kinds = {path: kind for path, (kind, _) in self.modules.items()}
        return kinds | {name: "experts" for name in self.config.get("target_parameters") or []}

    @property
    def model_type(self) -> str | None:
        return getattr(self.base, "model_type", None) or self.facts.get("model_type")

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.base, "vocab_size", None)

    @property
    def tied(self) -> bool:
        return bool(getattr(self.base, "tie_word_embeddings", False))

    @property
    def has_magnitudes(self) -> bool:
        """DoRA's: peft's use_dora, or magnitude vectors among the tensors."""
        return bool(self.config.get("use_dora") or any("magnitude" in parts for _, parts in self.modules.values()))

    @property
    def recipe(self) -> dict:
        extra = self.facts.get("extra")
        recipe = extra.get("recipe") if isinstance(extra, dict) else None
        return recipe if isinstance(recipe, dict) else {}

    def ranks(self) -> dict[str, int]:
        return {path: parts["A"].shape[0] for path, (_, parts) in self.modules.items()}

    def scalings(self) -> dict[str, float]:
        """Each module's scaling as peft applies it: alpha/r (or alpha/sqrt(r)) with its rank and alpha patterns."""
        rslora = bool(self.config.get("use_rslora"))
        return {path: lora_scaling(*rank_and_alpha(self.config, path, rank)[::-1], rslora)
                for path, rank in self.ranks().items()}

    def folding(self, per_rank: bool) -> tuple[float, dict[str, float]]:
        """(alpha, factor for each module's lora_B) for an engine that scales a module by alpha / r, r being the
        config's for every module, or with `per_rank` the module's own (llama.cpp). alpha is the default module's
        scaling times r, so that the default module keeps its B; rounded to fp32, as GGUF stores it."""
        rank = self.config["r"]
        alpha = lora_scaling(self.config.get("lora_alpha", 8), rank, bool(self.config.get("use_rslora"))) * rank
        alpha = torch.tensor(alpha, dtype=torch.float32).item()
        ranks = self.ranks()
        return alpha, {path: s / (alpha / (ranks[path] if per_rank else rank)) for path, s in self.scalings().items()}

    def normalized_targets(self) -> set[str]:
        return {STACKED.get(path.split(".")[-1], path.split(".")[-1]) for path in self.modules}

    def added_tokens(self) -> int:
        """Tokens beyond the base's vocabulary: in an embedding LoRA, a saved table, or added_tokens.json."""
        if self.vocab_size is None:
            return 0
        rows = [parts["A"].shape[1] for kind, parts in self.modules.values() if kind == "embedding"]
        rows += [parts["table"].shape[0] for _, parts in self.modules.values() if "table" in parts]
        try:
            ids = json.loads((self.directory / "added_tokens.json").read_text()).values()
        except (OSError, ValueError, AttributeError):  # none, or not a {token: id} object
            ids = []
        rows += [max(ids) + 1] if ids and all(isinstance(i, int) for i in ids) else []
        return max([0, *(row - self.vocab_size for row in rows)])


def read_adapter(directory: Path, base: str | None = None, *, config=None) -> Adapter:
    """The adapter in `directory` and its base's config: `config`, else from --base or a local
    base_model_name_or_path."""
    directory = Path(directory)
    settings = read_config_file(directory)
    peft_type = str(settings.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise LorafitError(f"{directory} holds a {peft_type or 'untyped'} adapter; export handles LoRA adapters")
    experts = bool(settings.get("target_parameters"))  # expert adapters may name no target_modules
    check_values(directory / CONFIG_FILE, {**settings, "target_modules": settings.get("target_modules") or []}
                 if experts else settings)
    tensors = read_weights_file(directory)
    extra = [key for key in tensors if KEY_PATTERN.match(key) is None or key.endswith(".bias")]
    lora = {key: tensor for key, tensor in tensors.items() if key not in extra}
    modules = lora_tensors(lora, directory / WEIGHTS_FILE) if lora or not experts else {}
    config = _text_config(config) if config is not None else _base_config(base, settings)
    return Adapter(directory, settings, modules, extra, read_facts(directory), config, base)


def _base_config(base: str | None, config: dict):
    from lorafit.model.load import load_config

    name = base or config.get("base_model_name_or_path")
    if not base and not (isinstance(name, str) and Path(name).expanduser().is_dir()):
        return None  # a hub id in the adapter's config: export reads nothing from the network on its own
    try:
        return _text_config(load_config(name))
    except LorafitError:
        if base:
            raise
        return None


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def export_adapter(adapter_dir: Path, engine_name: str, out: Path | None, *, base: str | None = None,
                   check_only: bool = False, force: bool = False) -> dict:
    """Check the adapter against the engine's rules; unless refused or --check-only, write what the engine loads.

    Returns {adapter, engine, base, out, problems, ready_as_written, refused, written, serve}.
    """
    if engine_name not in ENGINES:
        raise LorafitError(f"--for {engine_name!r} is not an engine lorafit knows; use one of {', '.join(ENGINES)}")
    if out is None and not check_only:
        raise LorafitError("give OUT, the folder to write to (or --check-only to write nothing)")
    engine = ENGINES[engine_name]
    adapter = read_adapter(adapter_dir, base)
    problems = check(adapter, engine)
    chat, chat_problems = chat_files(adapter, engine)
    problems += chat_problems
    merging = any(p.level == MERGE for p in problems)
    refused = any(p.level == REFUSE for p in problems) or (merging and base is None)
    if merging or refused:  # no adapter is written: how one would be served does not matter
        problems = [p for p in problems if p.level in (REFUSE, MERGE) or p.rule not in ADAPTER_FORM]
    result = {
        "adapter": str(adapter_dir), "engine": engine.name, "base": base, "out": None if out is None else str(out),
        "problems": [_shown(problem, base, refused) for problem in problems],
        "ready_as_written": not any(p.level in (REFUSE, MERGE, FIXED) for p in problems),
        "refused": refused, "written": None, "serve": None,
    }
    if refused or check_only:
        return result
    from lorafit.adapter.merge import check_out, merge_adapter

    out = Path(out)
    check_out(out, base, Path(adapter_dir), force=force)
    if engine.gguf and not merging:
        from lorafit.adapter.gguf import require_gguf

        require_gguf()
    if merging:
        merge_adapter(base, Path(adapter_dir), out, force=True)  # the merged model: what every engine serves
        for name, data in chat.items():
            write_atomic(out / name, data)
        result["written"] = "merged model"
    else:
        files = _gguf_files(adapter) if engine.gguf else _peft_files(adapter, engine)
        with staged_dir(out) as staging:
            for name, data in {**files, **chat}.items():
                if callable(data):
                    data(staging / name)  # a writer that streams to the file
                else:
                    (staging / name).write_bytes(data)
        result["written"] = "GGUF adapter" if engine.gguf else "PEFT adapter"
    result["serve"] = serve_hint(engine, out, base, merged=merging, chat=bool(chat))
    return result


def _shown(problem: Problem, base: str | None, refused: bool) -> dict:
    """A problem as reported: a MERGE problem says what export does about it."""
    shown = asdict(problem)
    if problem.level == MERGE and not base:
        shown["text"] += "; pass --base BASE to write the merged model instead"
    elif problem.level == MERGE and not refused:
        shown["text"] += "; writing the merged model instead (lorafit merge), which it serves as a plain model"
    return shown


def _peft_files(adapter: Adapter, engine: Engine) -> dict[str, bytes]:
    """The PEFT folder; where the engine reads one alpha, every module's scaling is folded into its lora_B."""
    from safetensors.torch import save

    if not scaling_folds(adapter, engine):
        return {CONFIG_FILE: _json(adapter.config), WEIGHTS_FILE: (adapter.directory / WEIGHTS_FILE).read_bytes()}
    config, factors = folded_config(adapter)
    tensors = {}
    for path, (kind, parts) in adapter.modules.items():
        for part, tensor in parts.items():
            if part != "table":
                tensors[weight_key(path, part, kind)] = tensor * factors[path] if part == "B" else tensor
    return {CONFIG_FILE: _json(config), WEIGHTS_FILE: save(tensors, metadata={"format": "pt"})}


def folded_config(adapter: Adapter) -> tuple[dict, dict[str, float]]:
    """(config, factor for each module's lora_B) so that one scaling s, the default module's, is right everywhere.

    With lora_alpha = s·r and alpha_pattern[key] = s·rank_pattern[key], peft (and a vLLM that reads the patterns)
    scales every module by s, as does an engine that reads only r and lora_alpha; B carries the rest.
    """
    alpha, factors = adapter.folding(per_rank=False)
    scaling = alpha / adapter.config["r"]
    patterns = adapter.config.get("rank_pattern") or {}
    return {**adapter.config, "lora_alpha": _number(alpha), "use_rslora": False,
            "alpha_pattern": {key: _number(scaling * rank) for key, rank in patterns.items()}}, factors


def _gguf_files(adapter: Adapter) -> dict:
    from lorafit.adapter.gguf import write_gguf

    return {"adapter.gguf": lambda path: write_gguf(adapter, path)}


def _number(value: float) -> int | float:
    return int(value) if math.isclose(value, round(value), rel_tol=0, abs_tol=1e-9) else value


def _json(data: dict) -> bytes:
    return json_text(data).encode()


def readiness(adapter_dir: Path, config=None) -> str:
    """One line: for which engines the adapter loads as written, which need `lorafit export`, which refuse it.
    `config` is the base's transformers config (train has it at hand)."""
    adapter = read_adapter(adapter_dir, config=config)
    ready, convert, refused = [], [], []
    for engine in ENGINES.values():
        # a base that cannot be read here is export's to be given (--base), not a fault of the adapter
        levels = {FIXED if problem.rule == "base" else problem.level for problem in check(adapter, engine)}
        (refused if levels & {REFUSE, MERGE} else convert if FIXED in levels else ready).append(engine.label)
    parts = [f"serving: ready as written for {', '.join(ready) or 'no engine'}"]
    if convert:
        parts.append(f"{', '.join(convert)} after `lorafit export {adapter_dir} --for ENGINE --base BASE OUT`")
    if refused:
        parts.append(f"not as an adapter for {', '.join(refused)} (lorafit export --check-only says why)")
    return "; ".join(parts)
