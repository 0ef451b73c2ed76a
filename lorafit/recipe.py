"""The recipe's schema: a key these classes lack is an error. Reading a recipe file (TOML and --set) into a Recipe,
and writing one back, is lorafit.recipe_file's job."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
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
