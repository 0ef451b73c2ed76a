"""Tokenized rows with label masks, per task, fitted to max_length without losing what is supervised.

Rows come from `lorafit.data.rows`, prompts from `lorafit.data.prompts` and `lorafit.data.chat`, the length rules from
`lorafit.data.truncation`; batches of tokenized rows are made in `lorafit.data.batches`.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets.fingerprint import Hasher

from lorafit.data.batches import supervised_counts
from lorafit.data.chat import messages_of
from lorafit.data.files import short_repr
from lorafit.data.rows import (
    DEFAULT_EVAL_SPLIT,
    HELD_OUT,
    MissingSplit,
    describe_split,
    evaluation_split,
    held_out_rows,
    load_rows,
    task_fields,
)
from lorafit.data.tasks import IGNORE, encoder, label_token_ids
from lorafit.data.truncation import CUT, SHORTENED
from lorafit.errors import LorafitError
from lorafit.recipe import DataSection

__all__ = ["IGNORE", "TokenizedSplit", "label_token_ids", "tokenize_eval", "tokenize_split"]


FEATURES = {
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "prompt_len": datasets.Value("int32"),
    "row": datasets.Value("int32"),  # the split's row this example came from (a long document gives several)
    "fit": datasets.Value("int8"),  # KEPT, SHORTENED or CUT (truncation.py)
    "lost": datasets.Value("int32"),  # supervised tokens cut off
    # ROW_FACTS, what the step plan reads (a few bytes an example), so that a run never reads the token columns whole:
    "length": datasets.Value("int32"),  # tokens
    "supervised": datasets.Value("int32"),  # tokens that carry loss (lorafit.data.batches.supervised_mask's rule)
    "digest": datasets.Value("int64"),  # a hash of input_ids and labels, for the run's data fingerprint
}


ROW_FACTS = ("length", "supervised", "digest")


CODE_VERSION = hashlib.sha256(
    b"".join((Path(__file__).parent / name).read_bytes()
             for name in ("tokenize.py", "tasks.py", "truncation.py", "chat.py", "prompts.py", "batches.py"))
).hexdigest()[:16]


ROWS_PER_PROCESS = 20_000  # fewer rows than this a process: starting the processes costs more than it saves


@dataclass
class TokenizedSplit:
    """One split ready for batching, and what fitting it to max_length did, counted in rows of the split."""

    examples: datasets.Dataset
    dropped: int  # rows with nothing to predict, left out
    total: int  # rows read
    shortened: int = 0  # rows whose prompt or text was shortened, every supervised token kept
    cut: int = 0  # rows that lost supervised tokens (a response longer than max_length, early chat turns)
    cut_tokens: int = 0
    windowed: int = 0  # long documents split into several max_length windows
    name: str = ""

    def counts(self) -> dict[str, int]:
        """The counts as JSON-ready numbers (for reports and dry runs)."""
        return {"rows": self.total, "examples": len(self.examples), "shortened": self.shortened, "cut": self.cut,
                "cut_tokens": self.cut_tokens, "windowed": self.windowed, "dropped": self.dropped}

    def columns(self, *names: str) -> dict[str, np.ndarray]:
        """Per-example columns (length, supervised, ...) as NumPy arrays, read without the token columns."""
        return columns(self.examples, *names)

    def note(self) -> str | None:
        """One line saying what max_length and empty rows did to the split, or None when nothing happened."""
        parts = []
        if self.shortened:
            parts.append(f"{self.shortened} shortened to fit [data] max_length, every supervised token kept")
        if self.cut:
            parts.append(f"{self.cut} lost {self.cut_tokens} supervised tokens to max_length")
        if self.windowed:
            parts.append(f"{self.windowed} long documents split into windows ({len(self.examples)} rows now)")
        if self.dropped:
            parts.append(f"{self.dropped} with nothing to predict left out")
        return f"{self.name!r}: of {self.total} rows, " + "; ".join(parts) if parts else None


def columns(examples: datasets.Dataset, *names: str) -> dict[str, np.ndarray]:
    table = examples.select_columns(list(names)).with_format("arrow")[:]  # only these columns are gathered
    return {name: table.column(name).to_numpy() for name in names}


def tokenize_split(data: DataSection, tokenizer, split: str, *, evaluation: bool = False, progress: bool = False,
                   draw: tuple[int, int] = (0, 0)) -> TokenizedSplit:
    """Rows -> input_ids, labels (IGNORE where no loss) and prompt_len, fitted to max_length.

    Under [data] eval_fraction the training split is the rows not held out and HELD_OUT the rest. Evaluation
    splits are capped at max_eval_examples rows. `progress` shows a bar while rows are tokenized (cached splits
    are not tokenized again). With [data] streaming, training draws the stream's first examples until it has
    `draw` = (examples, tokens) of them (lorafit.data.plan.stream_draw).
    """
    if data.streaming and not evaluation and draw == (0, 0):
        raise ValueError("a streamed training split needs the amount to draw (lorafit.data.plan.stream_draw)")
    if not (data.eval_fraction and split in (HELD_OUT, data.train_split)):
        examples, total = _tokenize(data, tokenizer, split, evaluation, progress, draw)
        return _counted(examples, total, split)
    examples, total = _tokenize(data, tokenizer, data.train_split, False, progress, draw)
    held = held_out_rows(total, data.eval_fraction)
    rows = sorted(held if split == HELD_OUT else set(range(total)) - held)
    if evaluation and data.max_eval_examples:
        rows = rows[: data.max_eval_examples]
    wanted = np.isin(columns(examples, "row")["row"], rows)
    return _counted(examples.select(np.flatnonzero(wanted)), len(rows), split)


def tokenize_eval(data: DataSection, tokenizer, split: str | None = None, *, progress: bool = False) -> TokenizedSplit | None:
    """The evaluation rows: `split`, else the recipe's (eval_fraction's held-out rows or eval_split). None when the
    recipe has none: eval_split empty, or the default 'validation' missing from the data."""
    name = split or evaluation_split(data)
    if name is None:
        return None
    try:
        return tokenize_split(data, tokenizer, name, evaluation=True, progress=progress)
    except MissingSplit:
        if split is None and name == DEFAULT_EVAL_SPLIT:
            return None
        raise


def tokenizing_processes(rows: int) -> int | None:
    """Processes to tokenize `rows` with: every core this process may use, a core per ROWS_PER_PROCESS rows."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    count = min(cores, rows // ROWS_PER_PROCESS)
    return count if count > 1 else None


def _tokenize(data: DataSection, tokenizer, split: str, evaluation: bool, progress: bool,
              draw: tuple[int, int]) -> tuple[datasets.Dataset, int]:
    """(examples, rows read): every row's examples, tagged with the row they came from."""
    fields = task_fields(data)
    encode = encoder(data, tokenizer)
    where = describe_split(data, split)

    def encode_batch(batch: dict, indices: list[int]) -> dict:
        examples = encode(_read_rows(data, fields, batch, indices, where), indices, where)
        return example_columns(examples, features)

    features = dict(FEATURES)
    if data.task == "classification":
        features["label_index"] = datasets.Value("int32")
    if data.streaming:
        from lorafit.data.stream import drawn

        key = Hasher.hash((data.model_dump(), split, evaluation, draw, Hasher.hash(tokenizer), CODE_VERSION))
        examples = drawn(lambda: load_rows(data, split, evaluation=evaluation), encode_batch,
                         datasets.Features(features), key, draw, lambda names: check_fields(names, fields, where),
                         where, progress)
        return examples, int(columns(examples, "row")["row"].max()) + 1
    rows = load_rows(data, split, evaluation=evaluation)
    check_fields(rows.column_names, fields, where)
    with _mapping(progress):
        examples = rows.map(
            encode_batch,
            batched=True,
            with_indices=True,
            remove_columns=rows.column_names,
            features=datasets.Features(features),
            new_fingerprint=_fingerprint(rows, data, tokenizer),
            desc=f"Tokenizing {split}",
            num_proc=tokenizing_processes(len(rows)),
        )
    if len(examples) == 0:
        raise LorafitError(f"no row of {where} has anything to predict; check [data] {next(iter(fields.values()))}")
    return examples, len(rows)


def example_columns(examples: list[dict], features: dict) -> dict:
    """The examples of one batch as columns, with each one's length, supervised tokens and digest."""
    out = {name: [example[name] for example in examples] for name in features if name not in ROW_FACTS}
    ids, labels = (pa.array(out[name], type=pa.list_(pa.int32())) for name in ("input_ids", "labels"))
    offsets = ids.offsets.to_numpy()
    flat_ids, flat_labels = ids.flatten().to_numpy(), labels.flatten().to_numpy()
    digests = b"".join(hashlib.blake2b(flat_ids[start:stop].tobytes() + flat_labels[start:stop].tobytes(),
                                       digest_size=8).digest() for start, stop in zip(offsets[:-1], offsets[1:]))
    return {**out, "length": np.diff(offsets).astype(np.int32), "supervised": supervised_counts(labels),
            "digest": np.frombuffer(digests, dtype="<i8")}


@contextmanager
def _mapping(show: bool):
    """Around datasets' map: its progress bars on (or off), and os.environ kept the object it was.

    The CLI keeps the bars off otherwise (messages.library_logs). map with num_proc leaves a copy of os.environ in
    its place, while rich, click and others keep reading the original: it is put back, with the copy's values.
    """
    hidden, environ = datasets.are_progress_bars_disabled(), os.environ
    (datasets.enable_progress_bars if show else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.disable_progress_bars if hidden else datasets.enable_progress_bars)()
        if os.environ is not environ:
            environ.update(os.environ)
            os.environ = environ


def _counted(examples: datasets.Dataset, total: int, name: str) -> TokenizedSplit:
    """The split with its counts, read from the examples' row, fit and lost columns."""
    counts = columns(examples, "row", "fit", "lost")
    _, per_row = np.unique(counts["row"], return_counts=True)
    return TokenizedSplit(
        examples=examples, dropped=total - len(per_row), total=total, name=name,
        shortened=int((counts["fit"] == SHORTENED).sum()), cut=int((counts["fit"] == CUT).sum()),
        cut_tokens=int(counts["lost"].sum()), windowed=int((per_row > 1).sum()),
    )


def _fingerprint(rows: datasets.Dataset, data: DataSection, tokenizer) -> str:
    """Name the tokenized rows by all they depend on, this code included, so a cached copy is never stale."""
    return Hasher.hash((rows._fingerprint, data.model_dump(), Hasher.hash(tokenizer), CODE_VERSION))


def check_fields(present: list[str], fields: dict[str, str], where: str) -> None:
    """Refuse a split that lacks a field the task reads, naming the fields it has."""
    for field, key in fields.items():
        if field not in present:
            fix = f"the template's {{{field}}}: add the field or fix [data] template" if key == "template" else (
                f"set [data] {key}")
            raise LorafitError(f"{where} has no field {field!r} (fields: {', '.join(present) or 'none'}); {fix}")


def _read_rows(data: DataSection, fields: dict[str, str], batch: dict, indices: list[int], where: str) -> list[dict]:
    """The task's fields of a batch's rows: texts checked to be text, labels as label indexes."""
    rows = [{} for _ in indices]
    for field, key in fields.items():
        for row, value, index in zip(rows, batch[field], indices):
            if key == "label_field":
                row[field] = _label_index(value, data.labels, where, index)
            elif key == "messages_field":
                row[field] = messages_of(value, where, index, field)
            else:
                row[field] = _text(value, key, field, where, index)
    return rows


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
