"""Tokenized rows with label masks: templates, label words, and what is cut at max_length.

Rows come from `lorafit.rows`; batches of tokenized rows are made in `lorafit.batches`.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets.fingerprint import Hasher

from lorafit.errors import LorafitError
from lorafit.recipe import DataSection
from lorafit.rows import describe_split, load_rows, short_repr, task_fields

IGNORE = -100  # the label of a position with no loss: the ignore_index of torch and transformers losses
FEATURES = {
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "prompt_len": datasets.Value("int32"),
}
CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


@dataclass
class TokenizedSplit:
    """One split ready for batching; `dropped` rows lost every supervised token to max_length."""

    examples: datasets.Dataset
    dropped: int
    total: int


def check_template(template: str) -> None:
    """The template must hold `{text}` and no other field; literal braces are written `{{` and `}}`."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise LorafitError(
            f"[data] template {template!r} is not a valid template ({error}); write literal braces as {{{{ and }}}}"
        ) from error
    if "text" not in names:
        raise LorafitError(
            f"[data] template must contain {{text}}, where each row's text goes (got {template!r}); "
            'e.g. template = "Review: {text}\\nSentiment:"'
        )
    others = sorted(set(names) - {"text"})
    if others:
        raise LorafitError(
            f"[data] template has {{{others[0]}}}, but only {{text}} is filled in; "
            "write a literal brace as {{ or }}"
        )


def label_token_ids(data: DataSection, tokenizer) -> list[list[int]]:
    """Token ids of " <label word>" for each label, exactly as they are appended after the prompt."""
    if not data.labels:
        raise LorafitError(
            '[data] labels is empty; classification needs the label words, e.g. labels = ["negative", "positive"]'
        )
    ids = _encode(tokenizer, [" " + word for word in data.labels], special=False)
    seen: dict[tuple[int, ...], str] = {}
    for word, tokens in zip(data.labels, ids):
        if not tokens:
            raise LorafitError(f"[data] label {word!r} tokenizes to no tokens; use a label word")
        if tuple(tokens) in seen:
            raise LorafitError(
                f"[data] labels {seen[tuple(tokens)]!r} and {word!r} tokenize to the same ids {tokens}; "
                "use distinct label words"
            )
        seen[tuple(tokens)] = word
    return ids


def tokenize_split(data: DataSection, tokenizer, split: str) -> TokenizedSplit:
    """Rows -> input_ids, labels (IGNORE where no loss) and prompt_len, cut at max_length from the right."""
    check_template(data.template)
    label_ids = label_token_ids(data, tokenizer) if data.task == "classification" else []
    if data.task != "classification" and tokenizer.eos_token_id is None:
        raise LorafitError(
            f"the tokenizer has no eos token, which the {data.task} task appends to each row; use one that has"
        )
    rows = load_rows(data, split)
    where = describe_split(data, split)
    _check_fields(rows, data, where)

    def encode_batch(batch: dict, indices: list[int]) -> dict:
        pieces = _encode_rows(data, tokenizer, label_ids, _read_fields(data, batch, indices, where))
        return _assemble(pieces, data.max_length, data.task == "classification")

    features = dict(FEATURES)
    if data.task == "classification":
        features["label_index"] = datasets.Value("int32")
    examples = rows.map(
        encode_batch,
        batched=True,
        with_indices=True,
        remove_columns=rows.column_names,
        features=datasets.Features(features),
        new_fingerprint=_fingerprint(rows, data, tokenizer),
        desc=f"Tokenizing {split}",
    )
    if len(examples) == 0:
        raise LorafitError(
            f"every row of {where} lost its supervised tokens to max_length={data.max_length}; raise [data] max_length"
        )
    return TokenizedSplit(examples=examples, dropped=len(rows) - len(examples), total=len(rows))


def _fingerprint(rows: datasets.Dataset, data: DataSection, tokenizer) -> str:
    """Name the tokenized rows by all they depend on, this file's code included, so a cached copy is never stale."""
    return Hasher.hash((rows._fingerprint, data.model_dump(), Hasher.hash(tokenizer), CODE_VERSION))


def _check_fields(rows: datasets.Dataset, data: DataSection, where: str) -> None:
    for key, field in task_fields(data).items():
        if field not in rows.column_names:
            fields = ", ".join(rows.column_names) or "none"
            raise LorafitError(f"{where} has no field {field!r} (fields: {fields}); set [data] {key}")


def _read_fields(data: DataSection, batch: dict, indices: list[int], where: str) -> dict[str, list]:
    """The task's fields of a batch, keyed by recipe key: texts checked to be text, labels as label indexes."""
    read = {}
    for key, field in task_fields(data).items():
        if key == "label_field":
            read[key] = [_label_index(value, data.labels, where, index) for value, index in zip(batch[field], indices)]
        else:
            read[key] = [_text(value, key, field, where, index) for value, index in zip(batch[field], indices)]
    return read


def _encode_rows(data: DataSection, tokenizer, label_ids: list[list[int]], read: dict[str, list]) -> list[tuple]:
    """(prompt ids, target ids, label index) per row; the loss falls on the target ids only."""
    eos = tokenizer.eos_token_id
    if data.task == "text":  # no prompt: every token is a target (the shift happens in the loss)
        texts = _encode(tokenizer, [data.template.format(text=text) for text in read["text_field"]], special=True)
        return [([], ids + [eos], None) for ids in texts]
    key = "text_field" if data.task == "classification" else "prompt_field"
    prompts = _encode(tokenizer, [data.template.format(text=text) for text in read[key]], special=True)
    prompts = [prompt or [_start_id(tokenizer)] for prompt in prompts]
    if data.task == "completion":
        responses = _encode(tokenizer, read["response_field"], special=False)
        return [(prompt, response + [eos], None) for prompt, response in zip(prompts, responses)]
    return [(prompt, label_ids[label], label) for prompt, label in zip(prompts, read["label_field"])]


def _text(value, key: str, field: str, where: str, index: int) -> str:
    if isinstance(value, str):
        return value
    shown = "missing (null)" if value is None else f"{short_repr(value)}, not text"
    raise LorafitError(f"{where} row {index + 1}: field {field!r} is {shown}; fix the row or set [data] {key}")


def _label_index(value, labels: list[str], where: str, index: int) -> int:
    """A label is an index into `labels` or one of the label words."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # csv/parquet columns with gaps come back as floats
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    if isinstance(value, str) and value in labels:
        return labels.index(value)
    raise LorafitError(
        f"{where} row {index + 1}: label {short_repr(value)} is not in [data] labels {labels} "
        f"(nor an index 0..{len(labels) - 1}); add it to labels or fix the row"
    )


def _assemble(pairs: list[tuple], max_length: int, with_label_index: bool) -> dict:
    """Concatenate prompt and target, cut at max_length, and leave out rows with no supervised token left."""
    out = {"input_ids": [], "labels": [], "prompt_len": []}
    if with_label_index:
        out["label_index"] = []
    for prompt, target, label in pairs:
        input_ids = (prompt + target)[:max_length]
        labels = ([IGNORE] * len(prompt) + target)[:max_length]
        if all(token == IGNORE for token in labels):
            continue
        out["input_ids"].append(input_ids)
        out["labels"].append(labels)
        out["prompt_len"].append(len(prompt))
        if with_label_index:
            out["label_index"].append(label)
    return out


def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def _start_id(tokenizer) -> int:
    """An empty prompt starts with bos (or eos, GPT-2's start token) so the first target token has a context."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise LorafitError(
            "a row's prompt is empty and the tokenizer has no bos/eos token to start it; set [data] template"
        )
    return start
