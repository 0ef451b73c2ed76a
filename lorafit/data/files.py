"""Local data files -> raw rows: .jsonl/.txt read by lorafit (errors name the line), .json/.csv/.parquet by datasets.

A split may be one file, a list of files or a glob (`shards/*.jsonl`), read in the order given (a glob's matches
sorted by name) as one split. A .txt file is one document: one row whose text field holds the whole file.
What lorafit reads itself is kept as an Arrow file in the datasets cache, named by the files' paths, sizes and
modification times, so a second start memory-maps it instead of parsing the files again (datasets does the same
for the formats it reads).
"""
from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import datasets
import pyarrow as pa
from datasets.fingerprint import Hasher
from datasets.table import InMemoryTable

from lorafit.errors import LorafitError
from lorafit.recipe import DATA_SUFFIXES
from lorafit.storage import input_file

BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}
READER_VERSION = Hasher.hash(Path(__file__).read_bytes())  # a change in how files are read renames the cache


def is_pattern(spec: str) -> bool:
    return any(char in spec for char in "*?[")


def expand(spec: str | list[str]) -> list[Path]:
    """The files of one split: a path, a glob, or a list of them; each checked to exist and to be data."""
    paths = []
    for item in [spec] if isinstance(spec, str) else spec:
        if is_pattern(item):
            matches = sorted(Path(match) for match in glob.glob(item, recursive=True))
            if not matches:
                raise LorafitError(f"[data] source pattern {item} matches no file; fix the pattern")
            paths += matches
        else:
            paths.append(Path(item))
    for path in paths:
        input_file(path, "data file", "fix [data] source")
        if path.suffix not in DATA_SUFFIXES:
            raise LorafitError(f"data file {path} is not one of {', '.join(DATA_SUFFIXES)}; convert it or rename it")
    suffixes = sorted({path.suffix for path in paths})
    if len(suffixes) > 1:
        raise LorafitError(f"[data] source mixes {' and '.join(suffixes)} files in one split; convert them to one format")
    return paths


def read_files(paths: list[Path], needed: dict[str, str], text_field: str) -> datasets.Dataset:
    """The rows of `paths` (one format), as one data set; `needed` are the fields the task reads (field -> key)."""
    suffix = paths[0].suffix
    if suffix in BUILDERS:
        files = [str(path) for path in paths]
        try:
            return datasets.load_dataset(BUILDERS[suffix], data_files=files, split="train")
        except Exception as error:  # datasets raises many types here (even StopIteration for an empty .json)
            raise LorafitError(f"could not read {_names(paths)} as {BUILDERS[suffix]}: {root_cause(error)}; "
                               "fix the file") from error
    if suffix == ".txt":
        return _cached(paths, text_field, lambda: _documents(paths, text_field))
    return _cached(paths, sorted(needed.items()), lambda: _joined(paths, needed))


def _cached(paths: list[Path], options, read: Callable[[], pa.Table]) -> datasets.Dataset:
    """The rows `read()` gives, from an Arrow file in the datasets cache that is named by the files' identities."""
    identity = [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in paths]
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "lorafit"
    cache = folder / f"rows-{Hasher.hash((identity, options, READER_VERSION))}.arrow"
    if not cache.is_file():
        table = read()
        if not table.num_rows:
            return datasets.Dataset(InMemoryTable(table))  # load_rows reports the empty split
        folder.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=folder, prefix=f".{cache.name}.", suffix=".tmp")
        os.close(handle)
        try:
            with pa.OSFile(temp, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            os.replace(temp, cache)  # whole or absent, for the processes that read it next
        finally:
            Path(temp).unlink(missing_ok=True)
    return datasets.Dataset.from_file(str(cache))


def _documents(paths: list[Path], field: str) -> pa.Table:
    texts = []
    for path in paths:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise LorafitError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from error
    return pa.table({field: pa.array(texts, type=pa.string())})


def _joined(paths: list[Path], needed: dict[str, str]) -> pa.Table:
    tables = [_read_jsonl(path, needed) for path in paths]
    try:
        return pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise LorafitError(f"the files of [data] source ({_names(paths)}) give a field different types "
                           f"({one_line(error)}); give each field one type in every file") from error


def _read_jsonl(path: Path, needed: dict[str, str]) -> pa.Table:
    """One JSON object per line; errors name the line. Blank lines are skipped."""
    rows, lines = [], []
    # Split the bytes on b"\n" only: str.splitlines would also split on U+2028 inside JSON strings.
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        rows.append(_parse_line(path, number, raw))
        lines.append(number)
    return _rows_to_table(path, rows, lines, needed)


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


def _rows_to_table(path: Path, rows: list[dict], lines: list[int], needed: dict[str, str]) -> pa.Table:
    """Columns typed by pyarrow; a field the task reads must have one type in every row."""
    if not rows:
        return pa.table({})  # load_rows reports the empty split
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
    return pa.table(columns)


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
    return f"{path}: field {name!r} cannot be one column ({one_line(error)}); give it plain values of one type"


def _names(paths: list[Path]) -> str:
    return str(paths[0]) if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more"


def root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    return one_line(f"{type(error).__name__}: {error}").rstrip(": ")


def one_line(text) -> str:
    return " ".join(str(text).split())


def short_repr(value) -> str:
    """A value as error messages quote it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
