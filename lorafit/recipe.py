"""Recipe TOML -> a validated, typed Recipe. The classes below are the schema: a key they lack is an error."""

from __future__ import annotations

import copy
import difflib
import tomllib
from pathlib import Path
from typing import Literal, get_args, get_origin

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafit.errors import LorafitError
from lorafit.storage import input_file

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
# Names users bring from peft and transformers, pointed at ours in error messages.
ALIASES = {
    "learning_rate": "lr",
    "r": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size",
    "lr_scheduler_type": "schedule",
    "model_name_or_path": "name",
    "output_dir": "dir",
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


# Marks a key that may change between a run and its --resume: it does not change what is computed.
RESUMABLE = {"resumable": True}


class ModelSection(Section):
    name: str = "gpt2"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on a CUDA GPU with bf16, else fp32
    quantize: Literal["none", "nf4"] = "none"  # nf4: the decoder blocks' frozen projections in 4 bits (QLoRA)
    trust_remote_code: bool = False
    allow_pickle: bool = False  # read pytorch_model.bin from a local folder you trust (pickles can run code)


# LoRA layer variants; each has an entry in lorafit.lora.variants.VARIANTS.
VariantName = Literal["lora", "dora", "adalora"]


class AdaLoraSection(Section):
    """[lora.adalora]: AdaLoRA's own keys. Ranks start at init_rank and are pruned to target_rank on average; the
    budget holds for tinit steps, falls on a cubic to the target tfinal steps before the end, pruning every delta_t
    steps; importance EMAs with beta1/beta2; orth_reg_weight weighs the orthogonality penalty."""

    init_rank: int = Field(12, gt=0)
    target_rank: int = Field(8, gt=0)
    tinit: int = Field(0, ge=0)
    tfinal: int = Field(0, ge=0)
    delta_t: int = Field(1, gt=0)
    beta1: float = Field(0.85, ge=0, lt=1)
    beta2: float = Field(0.85, ge=0, lt=1)
    orth_reg_weight: float = Field(0.5, ge=0)


class LoraSection(Section):
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0, allow_inf_nan=False)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["q", "v"], min_length=1)
    init: Literal["kaiming", "gaussian", "pissa", "olora"] = "kaiming"
    use_rslora: bool = False
    variant: VariantName = "lora"  # dora: a trained magnitude per output row (peft's use_dora)
    adalora: AdaLoraSection | None = None  # variant = "adalora" only; None for the other variants

    @model_validator(mode="before")
    @classmethod
    def _adalora_keys(cls, values):
        """[lora.adalora] for an AdaLoRA recipe, defaults included; recipes written before the sub-table have its
        keys in [lora] itself, which are read into it (and win over it, as `--set lora.init_rank=4` should).
        Other variants read none of these keys and carry no sub-table."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        flat = {key: values.pop(key) for key in AdaLoraSection.model_fields if key in values}
        sub = values.pop("adalora", None)
        if values.get("variant") == "adalora":
            sub = sub.model_dump() if isinstance(sub, AdaLoraSection) else sub or {}
            values["adalora"] = {**sub, **flat} if isinstance(sub, dict) else sub  # not a table: the schema says so
        return values


# A split's local files: a path, a glob such as "shards/*.jsonl", or a list of them (lorafit.data.files).
Files = str | list[str]


class DataSection(Section):
    source: str | list[str] | dict[str, Files] = "glue"  # a hub id or dataset folder, files, or {split: files}
    streaming: bool = False  # hub data sets: rows drawn as training needs them, not downloaded whole
    config: str | None = None
    task: Literal["classification", "completion", "chat", "text"] = "classification"
    text_field: str = "sentence"
    label_field: str = "label"
    labels: list[str] = Field(default_factory=list)
    prompt_field: str = "prompt"
    response_field: str = "response"
    template: str = "{text}"  # {text} is text_field (prompt_field for completion); any other {name} is that field
    messages_field: str = "messages"  # chat: a list of {role, content} (or ShareGPT's {from, value})
    chat_template: str = ""  # chat: a Jinja template for tokenizers without one ("" = the tokenizer's)
    assistant_turns: Literal["all", "last"] = "all"  # chat: which assistant turns carry the loss
    train_split: str = "train"
    eval_split: str = "validation"  # "" = no evaluation
    eval_fraction: float = Field(0.0, ge=0, lt=1)  # > 0: hold out this share of the training rows for evaluation
    max_length: int = Field(128, gt=1)
    stride: int = Field(0, ge=0)  # text: tokens a window repeats from the one before as context (at least 1)
    packing: bool = False  # training rows laid end to end in max_length sequences (lorafit.data.packing)
    group_by_length: bool = True  # each step's rows of similar length (less padding); false: plain shuffled steps
    max_eval_examples: int = Field(0, ge=0, json_schema_extra=RESUMABLE)

    @field_validator("labels")
    @classmethod
    def _words(cls, labels: list[str]) -> list[str]:
        """An empty label would tokenize to a bare space and be scored as a class; repeats are refused by
        lorafit.data.tasks.label_token_ids (same token ids), which train calls before tokenizing the data."""
        if any(not word.strip() for word in labels):
            raise ValueError("every label must be a non-empty word")
        return labels

    @model_validator(mode="before")
    @classmethod
    def _text_field_of_the_task(cls, values):
        """text_field defaults to "text" for task = "text", the name plain-text data sets use (GLUE's is "sentence")."""
        if isinstance(values, dict) and values.get("task") == "text" and "text_field" not in values:
            return {**values, "text_field": "text"}
        return values


class TrainSection(Section):
    max_steps: int = Field(0, ge=0)
    epochs: int = Field(1, gt=0)
    # Per process; a resume may change these when the global batch (batch_size × grad_accum × processes) stays.
    batch_size: int = Field(16, gt=0, json_schema_extra=RESUMABLE)
    grad_accum: int = Field(1, gt=0, json_schema_extra=RESUMABLE)
    global_batch: int = Field(0, ge=0, json_schema_extra=RESUMABLE)  # 0: batch_size × grad_accum × processes
    lr: float = Field(2e-4, gt=0, allow_inf_nan=False)
    loraplus_lr_ratio: float = Field(0.0, ge=0, allow_inf_nan=False)  # LoRA+: B learns at lr × ratio; 0 = off
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    max_grad_norm: float = Field(1.0, ge=0, allow_inf_nan=False)
    seed: int = Field(42, ge=0, lt=2**32)  # numpy's seeds are 32-bit
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 where [model] dtype auto gives bf16
    save_every: int = Field(0, ge=0, json_schema_extra=RESUMABLE)
    log_every: int = Field(10, gt=0, json_schema_extra=RESUMABLE)
    eval_every: int = Field(0, ge=0)  # score the eval split every N steps (0: before and after training only)
    keep_best: bool = False  # keep the adapter with the best eval metric as adapter-best/ (needs eval_every)
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list, json_schema_extra=RESUMABLE
    )
    eval_batch_size: int = Field(32, gt=0, json_schema_extra=RESUMABLE)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2 shards the frozen model over the processes
    gradient_checkpointing: bool = False
    compile: bool = False
    # The share of each target's probability spread evenly over the vocabulary (F.cross_entropy's label_smoothing);
    # the training loss only: evaluation scores the plain log-likelihood.
    label_smoothing: float = Field(0.0, ge=0, lt=1)


# What [eval] metrics can score generated text with (lorafit.generation.scores).
GenerationMetric = Literal["bleu", "chrf", "rouge_l", "exact_match"]
GENERATION_METRICS: tuple[str, ...] = get_args(GenerationMetric)


class EvalSection(Section):
    """Completion and chat: generate for every evaluation prompt with these settings and score the text against the
    prompt's references. None of it changes training, so a resumed run may change any of it."""

    metrics: list[GenerationMetric] = Field(default_factory=list, json_schema_extra=RESUMABLE)  # [] = no generation
    num_beams: int = Field(1, gt=0, json_schema_extra=RESUMABLE)
    length_penalty: float = Field(1.0, allow_inf_nan=False, json_schema_extra=RESUMABLE)
    no_repeat_ngram_size: int = Field(0, ge=0, json_schema_extra=RESUMABLE)
    max_new_tokens: int = Field(64, gt=0, json_schema_extra=RESUMABLE)
    stop: list[str] = Field(default_factory=list, json_schema_extra=RESUMABLE)  # a completion ends before any of these
    lowercase: bool = Field(False, json_schema_extra=RESUMABLE)  # score case-insensitively (as e2e-metrics does)
    references_field: str = Field("", json_schema_extra=RESUMABLE)  # a field of eval rows listing every reference

    @field_validator("metrics")
    @classmethod
    def _once(cls, metrics: list[str]) -> list[str]:
        if len(set(metrics)) != len(metrics):
            raise ValueError("name each metric once")
        return metrics

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: list[str]) -> list[str]:
        if any(not text for text in stop):
            raise ValueError('a stop string cannot be empty; write e.g. stop = ["\\n\\n"]')
        return stop


class OutputSection(Section):
    dir: str = Field("runs/lorafit", min_length=1, json_schema_extra=RESUMABLE)


class Recipe(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: OutputSection = Field(default_factory=OutputSection)


def resumable_keys() -> set[str]:
    """'section.key' for every recipe key marked RESUMABLE on its schema field."""
    return {
        f"{section}.{key}"
        for section, field in Recipe.model_fields.items()
        for key, info in field.annotation.model_fields.items()
        if (info.json_schema_extra or {}).get("resumable")
    }


def changed_keys(old: Recipe, new: Recipe) -> set[str]:
    """'section.key' for every key whose value differs between two recipes."""
    before, after = old.model_dump(), new.model_dump()
    return {f"{s}.{k}" for s in after for k in after[s] if before.get(s, {}).get(k) != after[s][k]}


def is_local_data(source: str | list[str] | dict[str, Files]) -> bool:
    return isinstance(source, (dict, list)) or source.endswith(DATA_SUFFIXES)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override (`section.key=value`), validate, and resolve relative paths against the recipe's folder."""
    path = input_file(Path(path), "recipe", "pass --recipe with a TOML file such as recipes/tiny-sst2.toml")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise LorafitError(f"{path}: TOML syntax error: {error}; fix the line it names") from error
    except UnicodeDecodeError as error:
        raise LorafitError(f"{path} is not UTF-8 text; save the recipe as UTF-8") from error
    _resolve_paths(raw, path.parent)
    return with_overrides(raw, overrides, where=str(path))


def with_overrides(raw: dict, overrides: list[str], where: str = "recipe") -> Recipe:
    """`raw` (its paths resolved) with each `section.key=value` of `overrides` set, validated."""
    given, raw = override_table(overrides), copy.deepcopy(raw)
    _merge(raw, given)
    return validate(raw, where=where, overridden={f"{section}.{key}" for section in given for key in given[section]})


def override_table(overrides: list[str]) -> dict:
    """{section: {key: value}} of `section.key=value` items, paths resolved against the current folder."""
    table: dict = {}
    for item in overrides:
        _apply_override(table, item)
    _resolve_paths(table, Path.cwd())
    return table


def validate(raw: dict, where: str = "recipe", overridden: set[str] = frozenset()) -> Recipe:
    """The Recipe, or one line naming the key; a key given on the command line (`overridden`) is blamed there."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as error:
        problem = error.errors()[0]
        key = ".".join(str(part) for part in problem["loc"][:2])
        given, hint = [name for name in sorted(overridden) if name == key or name.startswith(f"{key}.")], ""
        if given:  # a key, or a section that only --set names (--set trian.lr=1)
            where = "--output" if given[0] == "output.dir" else f"--set {given[0]}"
            hint = f"; write a list as --set {key}=q,v or --set '{key}=[\"q\", \"v\"]'" if _is_list(key) else ""
        raise LorafitError(f"{where}: {_describe(problem)}{hint}") from error
    refuse_undefined(recipe, where)
    return recipe


def refuse_undefined(recipe: Recipe, where: str = "recipe") -> None:
    """Keys valid one by one that together name something lorafit does not define, one line each: the home of every
    rule that reads two or more keys and needs neither the model nor the data (those are in train/preflight.py)."""
    from lorafit.lora.variants import refusal  # each variant's and each start's own rules

    if recipe.model.quantize != "none" and recipe.train.parallel == "fsdp":
        raise LorafitError(f"{where}: [model] quantize with [train] parallel = 'fsdp' is not supported; use 'ddp'")
    problem = refusal(recipe.lora, recipe.train)
    if problem:
        raise LorafitError(f"{where}: {problem}")
    if recipe.eval.metrics and recipe.data.task not in ("completion", "chat"):
        raise LorafitError(
            f"{where}: [eval] metrics score generated text, which task = {recipe.data.task!r} does not produce; "
            "use them with task = 'completion' or 'chat', or remove them"
        )
    problem = _data_and_train_problem(recipe)
    if problem:
        raise LorafitError(f"{where}: {problem}")


def _data_and_train_problem(recipe: Recipe) -> str | None:
    """The first combination of [model], [data] and [train] keys that cannot work, said with its fix; None if none."""
    model, data, train = recipe.model, recipe.data, recipe.train
    local = is_local_data(data.source)
    if model.dtype == "float16" and train.mixed_precision != "fp16":  # "auto" never resolves to fp16
        return ("[model] dtype = 'float16' trains without loss scaling unless [train] mixed_precision = 'fp16'; "
                "set that, or use bfloat16 or float32 weights")
    if train.keep_best and not train.eval_every:
        return "[train] keep_best needs evaluations during training to choose from; set [train] eval_every"
    if data.task == "text" and data.stride >= data.max_length - 1:
        return (f"[data] stride = {data.stride} leaves no new tokens in a window of max_length = {data.max_length}; "
                "make stride smaller than max_length - 1")
    if data.task == "chat" and data.template != "{text}":
        return ("[data] template is not used by task = 'chat', whose rows the chat template formats; remove it "
                "(or give [data] chat_template)")
    if local and data.task != "text" and any(name.endswith(".txt") for name in _file_names(data.source)):
        return (f"[data] source has .txt files, which hold plain documents that only task = 'text' reads; "
                f"convert them to .jsonl rows for task = {data.task!r}")
    if data.streaming and local:
        return ("[data] streaming draws rows from a hub data set or a dataset folder, and local files are read "
                "whole; set streaming = false")
    if data.streaming and not train.max_steps:
        return "[data] streaming has no end to count epochs by; set [train] max_steps"
    if data.streaming and data.eval_fraction:
        return "[data] eval_fraction holds out a share of the whole data set, which streaming never reads; use eval_split"
    if data.streaming and data.eval_split and not data.max_eval_examples:
        return ("[data] streaming draws the evaluation split as well; set [data] max_eval_examples (e.g. 500), "
                'or eval_split = "" for no evaluation')
    return None


def _file_names(source) -> list[str]:
    if isinstance(source, str):
        return [source]
    return [name for value in (source.values() if isinstance(source, dict) else source) for name in _file_names(value)]


def _describe(problem: dict) -> str:
    location = [str(part) for part in problem["loc"] if not str(part).startswith(("str", "dict"))]
    key = _key_name(location)
    if problem["type"] == "extra_forbidden":
        return f"unknown key {key}{_suggestion(location)}; remove it or fix its spelling"
    got = problem.get("input")
    return f"{key}: {problem['msg'].lower().removeprefix('value error, ')} (got {got!r}); fix the value"


def _key_name(location: list[str]) -> str:
    if len(location) == 1:
        return f"section [{location[0]}]"
    return f"[{location[0]}] {'.'.join(location[1:])}"


def _suggestion(location: list[str]) -> str:
    """Name the closest valid key, so a typo such as 'learning_rate' points to 'lr'."""
    choices = _keys_at(location[:-1])
    if choices is None:
        return ""
    alias = ALIASES.get(location[-1], location[-1])
    if alias in choices:
        return f" (did you mean {alias!r}?)"
    home = [name for name, field in Recipe.model_fields.items() if alias in field.annotation.model_fields]
    if len(location) > 1 and home:  # a key of another section, such as [lora] learning_rate
        return f" (did you mean [{home[0]}] {alias}?)"
    close = difflib.get_close_matches(location[-1], choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(choices)})"


def _keys_at(location: list[str]) -> list[str] | None:
    """The keys the schema allows in a section or sub-table ([] is the top level), or None if it has none."""
    table: type[BaseModel] | None = Recipe
    for name in location:
        field = table.model_fields.get(name)
        kinds = (field.annotation, *get_args(field.annotation)) if field else ()
        table = next((kind for kind in kinds if isinstance(kind, type) and issubclass(kind, BaseModel)), None)
        if table is None:
            return None
    return list(table.model_fields)


def _apply_override(raw: dict, item: str) -> None:
    """`train.lr=1e-3`, or `lora.adalora.init_rank=4` for a sub-table's key: the value is read as TOML (numbers,
    booleans, lists), else taken as a plain string; a list key also takes comma-separated words (q,v)."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    sub_table_key = len(parts) == 3 and _keys_at(parts[:2]) is not None  # e.g. lora.adalora.init_rank
    if not sep or not all(parts) or not (len(parts) == 2 or sub_table_key):
        raise LorafitError(f"--set {item!r} is not section.key=value; write e.g. --set train.lr=1e-3")
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        value = text
    if _is_list(key.strip()) and not isinstance(value, list):  # q,v or all-linear
        value = [word.strip() for word in text.split(",") if word.strip()]
    section = raw
    for depth, name in enumerate(parts[:-1], start=1):
        section = section.setdefault(name, {})
        if not isinstance(section, dict):
            raise LorafitError(f"--set {item!r}: [{'.'.join(parts[:depth])}] is not a section")
    section[parts[-1]] = value


def _is_list(key: str) -> bool:
    """Whether `section.key` is a list in the schema (lora.targets, data.labels, train.report_to)."""
    section, _, name = key.partition(".")
    field = Recipe.model_fields[section].annotation.model_fields.get(name) if section in Recipe.model_fields else None
    return field is not None and get_origin(field.annotation) is list


def _merge(raw: dict, updates: dict) -> None:
    """Overrides over `raw`: a sub-table's keys are set one by one, so `--set lora.adalora.init_rank=4` keeps the
    recipe's other [lora.adalora] keys."""
    for section, values in updates.items():
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise LorafitError(f"--set {section}.{next(iter(values))}: [{section}] is not a section of the recipe; "
                               f"fix its {section} = ... line")
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                target[key].update(value)
            else:
                target[key] = value


def _resolve_paths(raw: dict, base: Path) -> None:
    """Make file-like values absolute: the model folder, local data files and the output folder."""
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("name"), str):
        name = model["name"]
        if name.startswith((".", "~")) or (base / name).is_dir():
            model["name"] = _absolute(name, base)
    data = raw.get("data")
    if isinstance(data, dict):
        source = data.get("source")
        if isinstance(source, str) and (is_local_data(source) or source.startswith((".", "~")) or (base / source).is_dir()):
            data["source"] = _absolute(source, base)
        elif isinstance(source, (list, dict)):
            data["source"] = _absolute_files(source, base)
    output = raw.get("output")
    if isinstance(output, dict) and isinstance(output.get("dir"), str) and output["dir"].strip():  # "" stays an error
        output["dir"] = _absolute(output["dir"], base)


def _absolute_files(files, base: Path):
    """A list of files, or {split: files}, with every file name made absolute (anything else left to the schema)."""
    if isinstance(files, dict):
        return {split: _absolute_files(value, base) for split, value in files.items()}
    if isinstance(files, list):
        return [_absolute_files(value, base) for value in files]
    return _absolute(files, base) if isinstance(files, str) else files


def _absolute(value: str, base: Path) -> str:
    return str((base / Path(value).expanduser()).resolve())


def recipe_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML, for the run directory."""
    return tomli_w.dumps(recipe.model_dump(exclude_none=True))
