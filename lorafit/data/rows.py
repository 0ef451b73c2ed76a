"""Raw rows of one split, from the hub, a dataset folder or a local file, with errors that name the line.

Every split goes through `load_rows` (hub and local files alike), so a local copy of a hub dataset gives
exactly the rows the hub would.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import datasets
import pyarrow as pa
from datasets.table import InMemoryTable

from lorafit.data.prompts import template_fields
from lorafit.errors import LorafitError
from lorafit.recipe import DATA_SUFFIXES, DataSection
from lorafit.storage import input_file

BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}


DEFAULT_EVAL_SPLIT = "validation"  # [data] eval_split's default: when the data has no such split, no evaluation


HELD_OUT = "held-out"  # the split name of the training rows that [data] eval_fraction holds out


class MissingSplit(LorafitError):
    """The data has no such split (a missing default evaluation split only means no evaluation)."""


def load_rows(data: DataSection, split: str, *, evaluation: bool = False) -> datasets.Dataset:
    """Raw rows of one split, from the hub (or a dataset folder) or from a local file.

    Evaluation rows are capped at `max_eval_examples` (the first ones) whatever the split.
    """
    path = split_file(data, split)
    if path:
        rows = _read_file(path, needed=task_fields(data))
    else:
        rows = _read_hub(data, split)
    if len(rows) == 0:
        raise LorafitError(f"{describe_split(data, split)} has no rows; point [data] source at a file with data")
    if evaluation and data.max_eval_examples:
        rows = rows.select(range(min(data.max_eval_examples, len(rows))))
    return rows


def evaluation_split(data: DataSection) -> str | None:
    """The split evaluation reads: HELD_OUT under eval_fraction, else eval_split; None when eval_split is empty."""
    if data.eval_fraction:
        return HELD_OUT
    return data.eval_split or None


def held_out_rows(count: int, fraction: float) -> set[int]:
    """Which of `count` training rows [data] eval_fraction holds out: a fixed seeded draw, so every run (whatever
    its [train] seed) is scored on the same rows."""
    held = max(1, round(fraction * count))
    if held >= count:
        raise LorafitError(
            f"[data] eval_fraction = {fraction} of {count} training rows leaves none to train on; lower it"
        )
    return set(random.Random(f"lorafit-held-out:{count}").sample(range(count), held))


def no_evaluation_reason(data: DataSection) -> str:
    """Why a recipe trains without evaluation, for the run's note and report."""
    if not data.eval_split:
        return "[data] eval_split is empty"
    if isinstance(data.source, str) and data.source.endswith(DATA_SUFFIXES):
        return f"[data] source is one file, {Path(data.source).name}, which holds only the {data.train_split!r} split"
    return f"the data has no {data.eval_split!r} split"


def split_file(data: DataSection, split: str) -> Path | None:
    """The local file that holds `split`, or None when the source is a hub dataset or a dataset folder.

    A single file is the training split only: a file beside it is a split only when the recipe names it.
    """
    source = data.source
    if isinstance(source, dict):
        if split not in source:
            raise MissingSplit(
                f"[data] source has no file for split {split!r} (splits: {', '.join(source)}); "
                f'add {split} = "path" to it'
            )
        return _checked_file(Path(source[split]))
    if not source.endswith(DATA_SUFFIXES):
        return None
    path = Path(source)
    if split != data.train_split:
        raise MissingSplit(
            f"[data] source {path.name} is one file, the {data.train_split!r} split; name a file for {split!r} with "
            f'source = {{ {data.train_split} = "...", {split} = "..." }}, or set [data] eval_fraction'
        )
    return _checked_file(path)


def describe_split(data: DataSection, split: str) -> str:
    """How messages name a split: its file, or the hub dataset and split."""
    if split == HELD_OUT:
        return f"the rows held out of {describe_split(data, data.train_split)} by [data] eval_fraction"
    path = split_file(data, split)
    return str(path) if path else f"dataset {_hub_name(data)!r} split {split!r}"


def task_fields(data: DataSection) -> dict[str, str]:
    """The fields the task reads from each row, and the recipe key that names each one."""
    if data.task == "chat":
        return {data.messages_field: "messages_field"}
    names = template_fields(data)
    fields = {field: "template" for field in names.values()}
    if "text" in names:
        fields[names["text"]] = "prompt_field" if data.task == "completion" else "text_field"
    if data.task == "classification":
        fields[data.label_field] = "label_field"
    if data.task == "completion":
        fields[data.response_field] = "response_field"
    return fields


def _checked_file(path: Path) -> Path:
    input_file(path, "data file", "fix [data] source")
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
        row = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))  # a BOM some editors write first
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
    if key == "messages_field":  # a tool call (content null) or content parts (a list) beside plain text
        for value, line in present:
            for number, message in enumerate(value if isinstance(value, list) else [], start=1):
                content = message.get("content", message.get("value")) if isinstance(message, dict) else message
                if not isinstance(content, str):
                    return (f"{path} line {line}: message {number} of field {name!r} has {short_repr(content)} as "
                            "its content, not text (tool calls and content parts are not read); fix the row")
    if key not in ("label_field", "messages_field"):
        odd = next(((value, line) for value, line in present if not isinstance(value, str)), None)
        if odd:
            value, line = odd
            return f"{path} line {line}: field {name!r} is {short_repr(value)}, not text; fix the row or set [data] {key}"
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
        raise MissingSplit(
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


def short_repr(value) -> str:
    """A value as error messages quote it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
