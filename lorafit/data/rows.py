"""Raw rows of one split, from the hub, a dataset folder or local files, with errors that name the line.

Every split goes through `load_rows` (hub and local files alike), so a local copy of a hub dataset gives
exactly the rows the hub would. Local files are read by `lorafit.data.files`.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import datasets

from lorafit.data.files import expand, is_pattern, read_files, root_cause
from lorafit.data.prompts import template_fields
from lorafit.errors import LorafitError
from lorafit.recipe import DATA_SUFFIXES, DataSection, is_local_data

DEFAULT_EVAL_SPLIT = "validation"  # [data] eval_split's default: when the data has no such split, no evaluation


HELD_OUT = "held-out"  # the split name of the training rows that [data] eval_fraction holds out


class MissingSplit(LorafitError):
    """The data has no such split (a missing default evaluation split only means no evaluation)."""


def load_rows(data: DataSection, split: str, *, evaluation: bool = False) -> datasets.Dataset:
    """Raw rows of one split, from the hub (or a dataset folder) or from local files.

    Evaluation rows are capped at `max_eval_examples` (the first ones) whatever the split. With [data] streaming
    the rows are an iterable data set, read as they are drawn (lorafit.data.tokenize).
    """
    paths = split_files(data, split)
    if paths:
        rows = read_files(paths, needed=task_fields(data), text_field=data.text_field)
    else:
        rows = hub_split(data, split)
    if data.streaming:
        return rows.take(data.max_eval_examples) if evaluation else rows
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
    if _one_file(data.source):
        return f"[data] source is one file, {Path(data.source).name}, which holds only the {data.train_split!r} split"
    if is_local_data(data.source) and not isinstance(data.source, dict):
        return f"[data] source names files of one split, the {data.train_split!r} split"
    return f"the data has no {data.eval_split!r} split"


def no_evaluation_rows(data: DataSection) -> LorafitError:
    """The refusal of a command that needs evaluation rows (`eval`, its dry run) when the recipe has none."""
    return LorafitError(f"the recipe has no evaluation rows ({no_evaluation_reason(data)}); "
                        "pass --split NAME, or set [data] eval_split or eval_fraction")


def split_files(data: DataSection, split: str) -> list[Path] | None:
    """The local files that hold `split`, or None when the source is a hub dataset or a dataset folder.

    A single file (or list, or glob) is the training split only: other splits are files the recipe names.
    """
    source = data.source
    if isinstance(source, dict):
        if split not in source:
            raise MissingSplit(
                f"[data] source has no file for split {split!r} (splits: {', '.join(source)}); "
                f'add {split} = "path" to it'
            )
        return expand(source[split])
    if not is_local_data(source):
        return None
    if split != data.train_split:
        what = f"{Path(source).name} is one file" if _one_file(source) else "names files of one split"
        raise MissingSplit(
            f"[data] source {what}, the {data.train_split!r} split; name a file for {split!r} with "
            f'source = {{ {data.train_split} = "...", {split} = "..." }}, or set [data] eval_fraction'
        )
    return expand(source)


def describe_split(data: DataSection, split: str) -> str:
    """How messages name a split: its file (or files), or the hub dataset and split."""
    if split == HELD_OUT:
        return f"the rows held out of {describe_split(data, data.train_split)} by [data] eval_fraction"
    paths = split_files(data, split)
    if not paths:
        return f"dataset {_hub_name(data)!r} split {split!r}"
    return str(paths[0]) if len(paths) == 1 else f"the {len(paths)} files of split {split!r} ({paths[0]}, ...)"


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


def hub_split(data: DataSection, split: str) -> datasets.Dataset | datasets.IterableDataset:
    """One split of a hub dataset or dataset folder; an iterable one, read as it is drawn, with [data] streaming."""
    source = data.source
    name = _hub_name(data)
    path = Path(source).expanduser()
    if path.is_file():
        raise LorafitError(f"data file {source} is not one of {', '.join(DATA_SUFFIXES)}; convert it or rename it")
    if source.startswith(("/", ".", "~")) and not path.exists():
        raise LorafitError(f"[data] source {source} is neither a data file nor a dataset folder; fix the path")
    try:
        splits = datasets.load_dataset(source, data.config, streaming=data.streaming)
    except Exception as error:  # network, offline mode, missing config, bad files: all end the same way for a user
        if path.is_dir():
            hint = "clear [data] config for a plain folder of split files" if data.config else "check its files"
            raise LorafitError(f"could not load dataset folder {source} ({root_cause(error)}); {hint}") from error
        offline = "offline mode is on; " if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise LorafitError(
            f"could not load dataset {name!r} split {split!r} from the hub ({offline}{root_cause(error)}); "
            'use a local file: [data] source = "train.jsonl"'
        ) from error
    if split not in splits:
        raise MissingSplit(
            f"dataset {name!r} has no split {split!r} (splits: {', '.join(splits)}); set [data] train_split/eval_split"
        )
    return splits[split]


def _one_file(source) -> bool:
    return isinstance(source, str) and source.endswith(DATA_SUFFIXES) and not is_pattern(source)


def _hub_name(data: DataSection) -> str:
    return f"{data.source}/{data.config}" if data.config else str(data.source)
