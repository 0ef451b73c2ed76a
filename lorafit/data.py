"""Datasets (hub or local files) -> tokenized rows with label masks -> padded batches.

Every split goes through `load_rows` (hub and local files alike) and then the same tokenizing code,
so a local copy of a hub dataset gives exactly the rows the hub would.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import torch
from datasets.fingerprint import Hasher
from datasets.table import InMemoryTable

from lorafit.errors import LorafitError
from lorafit.recipe import DATA_SUFFIXES, DataSection

IGNORE = -100
GROUP_CHUNK = 50  # batches per length-sorted chunk: big enough to group lengths, small enough to stay random
BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}
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


# --------------------------------------------------------------------------- reading rows


def load_rows(data: DataSection, split: str) -> datasets.Dataset:
    """Raw rows of one split, from the hub (or a dataset folder) or from a local file.

    The eval split is capped at `max_eval_examples` rows (the first ones) when that is set.
    """
    path = split_file(data, split)
    if path:
        rows = _read_file(path, needed={field: key for key, field in task_fields(data).items()})
    else:
        rows = _read_hub(data, split)
    if len(rows) == 0:
        raise LorafitError(f"{describe_split(data, split)} has no rows; point [data] source at a file with data")
    if data.max_eval_examples and split == data.eval_split and split != data.train_split:
        rows = rows.select(range(min(data.max_eval_examples, len(rows))))
    return rows


def split_file(data: DataSection, split: str) -> Path | None:
    """The local file that holds `split`, or None when the source is a hub dataset or a dataset folder."""
    source = data.source
    if isinstance(source, dict):
        if split not in source:
            raise LorafitError(
                f"[data] source has no file for split {split!r} (splits: {', '.join(source)}); "
                f'add {split} = "path" to it'
            )
        return _checked_file(Path(source[split]))
    if not source.endswith(DATA_SUFFIXES):
        return None
    path = Path(source)
    if split == data.train_split:
        return _checked_file(path)
    sibling = path.with_name(split + path.suffix)
    if not sibling.is_file():
        raise LorafitError(
            f"no {split!r} split for {path}: {sibling} does not exist; name one file per split with "
            f'[data] source = {{ {data.train_split} = "...", {split} = "..." }}'
        )
    return sibling


def describe_split(data: DataSection, split: str) -> str:
    """How messages name a split: its file, or the hub dataset and split."""
    path = split_file(data, split)
    return str(path) if path else f"dataset {_hub_name(data)!r} split {split!r}"


def task_fields(data: DataSection) -> dict[str, str]:
    """The recipe keys the task reads from each row, and the field each one names."""
    if data.task == "classification":
        return {"text_field": data.text_field, "label_field": data.label_field}
    if data.task == "completion":
        return {"prompt_field": data.prompt_field, "response_field": data.response_field}
    return {"text_field": data.text_field}


def _checked_file(path: Path) -> Path:
    if not path.is_file():
        raise LorafitError(f"data file {path} does not exist; fix [data] source")
    if path.suffix not in DATA_SUFFIXES:
        raise LorafitError(f"data file {path} is not one of {', '.join(DATA_SUFFIXES)}; convert it or rename it")
    return path


def _read_file(path: Path, needed: dict[str, str]) -> datasets.Dataset:
    if path.suffix == ".jsonl":
        return _read_jsonl(path, needed)
    builder = BUILDERS[path.suffix]
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # datasets raises many types here (even StopIteration for an empty .json)
        raise LorafitError(f"could not read {path} as {builder}: {_root_cause(error)}; fix the file") from error


def _read_jsonl(path: Path, needed: dict[str, str]) -> datasets.Dataset:
    """One JSON object per line; errors name the line. Blank lines are skipped."""
    rows, lines = [], []
    # Split the bytes on b"\n" only: str.splitlines would also split on U+2028 inside JSON strings.
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        rows.append(_parse_line(path, number, raw))
        lines.append(number)
    return _rows_to_dataset(path, rows, lines, needed)


def _parse_line(path: Path, number: int, raw: bytes) -> dict:
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise LorafitError(
            f"{path} line {number} is not UTF-8 text ({error.reason}); save the file as UTF-8"
        ) from error
    except json.JSONDecodeError as error:
        raise LorafitError(
            f"{path} line {number} is not valid JSON: {error.msg} (column {error.colno}); fix or remove the line"
        ) from error
    if not isinstance(row, dict):
        raise LorafitError(
            f"{path} line {number} is a JSON {type(row).__name__}, not an object; "
            'write one {"field": value} per line'
        )
    return row


def _rows_to_dataset(path: Path, rows: list[dict], lines: list[int], needed: dict[str, str]) -> datasets.Dataset:
    """Columns typed by pyarrow; a field the task reads must have one type in every row."""
    if not rows:
        return datasets.Dataset(InMemoryTable(pa.table({})))  # load_rows reports the empty split
    names = list(dict.fromkeys(key for row in rows for key in row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            column = pa.array(values)
            datasets.Features.from_arrow_schema(pa.schema([(name, column.type)]))
        except (pa.ArrowException, OverflowError, TypeError, ValueError) as error:
            if name in needed:
                raise LorafitError(_mixed_column(path, name, needed[name], values, lines, error)) from error
            continue  # a field the task never reads is left out rather than failing the whole file
        columns[name] = column
    if not columns:
        raise LorafitError(f'{path} rows have no fields; write one object per line such as {{"text": "..."}}')
    return datasets.Dataset(InMemoryTable(pa.table(columns)))


def _mixed_column(path: Path, name: str, key: str, values: list, lines: list[int], error: Exception) -> str:
    """Name the first line that breaks the column: a non-text value in a text field, else a change of type."""
    present = [(value, line) for value, line in zip(values, lines) if value is not None]
    if key != "label_field":
        odd = next(((value, line) for value, line in present if not isinstance(value, str)), None)
        if odd:
            value, line = odd
            return f"{path} line {line}: field {name!r} is {_short(value)}, not text; fix the row or set [data] {key}"
    first_type, first_line = type(present[0][0]).__name__, present[0][1]
    for value, line in present:
        if type(value).__name__ != first_type:
            return (
                f"{path} line {line}: field {name!r} is {type(value).__name__} here but {first_type} "
                f"on line {first_line}; give the field one type in every row"
            )
    return f"{path}: field {name!r} cannot be one column ({_one_line(error)}); give it plain values of one type"


def _read_hub(data: DataSection, split: str) -> datasets.Dataset:
    source = data.source
    name = _hub_name(data)
    path = Path(source).expanduser()
    if path.is_file():
        raise LorafitError(f"data file {source} is not one of {', '.join(DATA_SUFFIXES)}; convert it or rename it")
    if source.startswith(("/", ".", "~")) and not path.exists():
        raise LorafitError(f"[data] source {source} is neither a data file nor a dataset folder; fix the path")
    try:
        splits = datasets.load_dataset(source, data.config)
    except Exception as error:  # network, offline mode, missing config, bad files: all end the same way for a user
        if path.is_dir():
            hint = "clear [data] config for a plain folder of split files" if data.config else "check its files"
            raise LorafitError(f"could not load dataset folder {source} ({_root_cause(error)}); {hint}") from error
        offline = "offline mode is on; " if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise LorafitError(
            f"could not load dataset {name!r} split {split!r} from the hub ({offline}{_root_cause(error)}); "
            'use a local file: [data] source = "train.jsonl"'
        ) from error
    if split not in splits:
        raise LorafitError(
            f"dataset {name!r} has no split {split!r} (splits: {', '.join(splits)}); set [data] train_split/eval_split"
        )
    return splits[split]


def _hub_name(data: DataSection) -> str:
    return f"{data.source}/{data.config}" if data.config else str(data.source)


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    return _one_line(f"{type(error).__name__}: {error}").rstrip(": ")


def _one_line(text) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- tokenizing


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
    shown = "missing (null)" if value is None else f"{_short(value)}, not text"
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
        f"{where} row {index + 1}: label {_short(value)} is not in [data] labels {labels} "
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


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- batching


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row in the batch; padding gets attention 0 and label IGNORE."""
    longest = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        length = len(row["input_ids"])
        input_ids[i, :length] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[i, :length] = torch.as_tensor(row["labels"], dtype=torch.long)
        attention_mask[i, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def supervised_tokens(labels) -> int:
    """How many label positions carry loss (not IGNORE): the tokens counted for tokens/s."""
    if isinstance(labels, torch.Tensor):
        return int((labels != IGNORE).sum())
    nested = (list, tuple, torch.Tensor)
    return sum(supervised_tokens(row) if isinstance(row, nested) else int(row != IGNORE) for row in labels)


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of row indices in which rows have similar lengths, to cut padding.

    Shuffle, sort chunks of GROUP_CHUNK batches by length, cut them into batches, shuffle the batches.
    Deterministic for (seed, epoch); every index appears once; the last partial batch is kept.
    """
    rng = random.Random(f"lorafit-batches:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = GROUP_CHUNK * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start:start + chunk], key=lambda index: lengths[index], reverse=True)
        batches.extend(group[i:i + batch_size] for i in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches
