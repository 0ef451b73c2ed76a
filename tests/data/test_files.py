"""[data] source beyond one file: lists and globs of files, .txt documents, hub streaming; tokenizing in processes.

Expected tokens come from the tokenizer on text built here, or from the same rows read as one plain file.
"""

from __future__ import annotations

import json
import os
import shutil

import datasets
import numpy as np
import pytest
from conftest import write_jsonl
from rich.console import Console
from typer.testing import CliRunner

import lorafit.data.files
import lorafit.data.tokenize
from lorafit.cli import app
from lorafit.data.plan import plan_training, stream_draw
from lorafit.data.tokenize import tokenize_eval, tokenize_split
from lorafit.errors import LorafitError
from lorafit.recipe import DataSection
from lorafit.recipe_file import validate
from lorafit.report.tables import draws_bars

ROWS = [{"prompt": f"question {i} " + "about the film " * (i % 4), "response": f" answer {i}" + " yes" * (i % 3)}
        for i in range(24)]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """A cache of its own for every test, so that each one reads and tokenizes its rows itself."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def completion(source, **overrides) -> DataSection:
    return DataSection(**{"source": source, "task": "completion", "template": "Q: {text}\nA:", "max_length": 32,
                          **overrides})


def token_rows(split) -> list[tuple[list[int], list[int]]]:
    return list(zip(split.examples["input_ids"], split.examples["labels"]))


def test_a_list_or_a_glob_of_files_is_the_rows_of_one_file_in_that_order(tmp_path, tokenizer):
    whole = tokenize_split(completion(str(write_jsonl(tmp_path / "all.jsonl", ROWS))), tokenizer, "train")
    (tmp_path / "parts").mkdir()
    parts = [str(write_jsonl(tmp_path / "parts" / f"{i}.jsonl", ROWS[i * 8:(i + 1) * 8])) for i in range(3)]
    listed = tokenize_split(completion(parts), tokenizer, "train")
    globbed = tokenize_split(completion(str(tmp_path / "parts" / "*.jsonl")), tokenizer, "train")
    assert token_rows(listed) == token_rows(globbed) == token_rows(whole)
    assert listed.examples["row"] == list(range(len(ROWS)))
    reversed_order = tokenize_split(completion(parts[::-1]), tokenizer, "train")
    assert token_rows(reversed_order) == token_rows(whole)[16:] + token_rows(whole)[8:16] + token_rows(whole)[:8]


def test_txt_files_are_one_document_each(tmp_path, tokenizer):
    texts = ["the film was good.\n\nthe plot was dull.", "I loved it.", ""]
    paths = []
    for i, text in enumerate(texts):
        paths.append(tmp_path / f"doc{i}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    data = DataSection(source=str(tmp_path / "doc*.txt"), task="text", text_field="text", max_length=64)
    split = tokenize_split(data, tokenizer, "train")
    assert split.examples["input_ids"] == [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts[:2]]
    assert (split.total, split.dropped) == (3, 1)  # the empty file has nothing to predict


def test_a_second_read_memory_maps_what_the_first_parsed(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    first = tokenize_split(completion(str(path)), tokenizer, "train")

    def refuse(*args):
        raise AssertionError("the file was parsed again")

    monkeypatch.setattr(lorafit.data.files, "_read_jsonl", refuse)
    again = tokenize_split(completion(str(path)), tokenizer, "train")
    assert token_rows(again) == token_rows(first) and again.examples.cache_files
    write_jsonl(path, ROWS[:5])  # a changed file is read again
    with pytest.raises(AssertionError, match="parsed again"):
        tokenize_split(completion(str(path)), tokenizer, "train")


@pytest.mark.parametrize(("source", "message"), [
    (["a.jsonl", "b.csv"], "mixes .csv and .jsonl files"),
    ("nothing-*.jsonl", "matches no file"),
    (["a.jsonl", "missing.jsonl"], "missing.jsonl does not exist"),
])
def test_files_that_cannot_make_one_split_are_refused(tmp_path, tokenizer, source, message):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.csv").write_text("prompt,response\nq,a\n")
    absolute = [str(tmp_path / name) for name in source] if isinstance(source, list) else str(tmp_path / source)
    with pytest.raises(LorafitError, match=message):
        tokenize_split(completion(absolute), tokenizer, "train")


def test_tokenizing_in_several_processes_gives_the_rows_one_process_gives(tmp_path, tokenizer, monkeypatch):
    path = str(write_jsonl(tmp_path / "train.jsonl", ROWS))
    alone = tokenize_split(completion(path), tokenizer, "train")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "other-cache"))
    monkeypatch.setattr(lorafit.data.tokenize, "tokenizing_processes", lambda rows: 2)
    environ = os.environ
    shared = tokenize_split(completion(path), tokenizer, "train")
    assert os.environ is environ  # datasets swaps in a copy, which libraries holding the original would not see
    assert len(shared.examples.cache_files) == 2  # one file per process
    assert token_rows(shared) == token_rows(alone)
    columns = ("row", "length", "supervised", "digest")
    assert all(np.array_equal(shared.columns(*columns)[name], alone.columns(*columns)[name]) for name in columns)


def test_a_row_error_in_a_tokenizing_process_is_the_same_one_line_error(tmp_path, tokenizer, monkeypatch):
    rows = ROWS + [{"prompt": 7, "response": " x"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setattr(lorafit.data.tokenize, "tokenizing_processes", lambda rows: 2)
    with pytest.raises(LorafitError, match="line 25: field 'prompt' is 7, not text"):
        tokenize_split(completion(str(path)), tokenizer, "train")


def test_tokenizing_bars_show_on_a_terminal_only_for_the_main_process_and_never_under_json():
    assert draws_bars(Console(force_terminal=True))
    assert not draws_bars(Console(force_terminal=True, quiet=True))  # the other processes' consoles
    assert not draws_bars(Console(force_terminal=True, stderr=True))  # --json: the commands print to stderr
    assert not draws_bars(Console(force_terminal=False))


# --------------------------------------------------------------------------- streaming


@pytest.fixture
def dataset_folder(tmp_path):
    """A dataset folder like a hub repository of JSON-lines splits: datasets streams it as it would the hub."""
    folder = tmp_path / "hub-like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    write_jsonl(folder / "validation.jsonl", ROWS[:6])
    return folder


def streaming_recipe(folder, **train):
    data = {"source": str(folder), "task": "completion", "template": "Q: {text}\nA:", "max_length": 32,
            "streaming": True, "max_eval_examples": 4}
    return validate({"data": data, "train": {"max_steps": 3, "batch_size": 2, **train}})


def test_streaming_draws_the_first_examples_a_runs_steps_need(dataset_folder, tokenizer):
    recipe = streaming_recipe(dataset_folder)
    whole = tokenize_split(recipe.data.model_copy(update={"streaming": False}), tokenizer, "train")
    drawn = tokenize_split(recipe.data, tokenizer, "train", draw=stream_draw(recipe, global_batch=2))
    assert token_rows(drawn) == token_rows(whole)[:6]  # 3 steps × 2 rows
    assert drawn.total == 6
    plan = plan_training(recipe, drawn, global_batch=2)
    assert (plan.steps.steps_per_epoch, plan.total_steps) == (3, 3)
    held_out = tokenize_eval(recipe.data, tokenizer)
    assert len(held_out.examples) == 4


def test_streaming_with_packing_draws_tokens_enough_for_its_packed_steps(dataset_folder, tokenizer):
    recipe = streaming_recipe(dataset_folder, max_steps=2)
    recipe.data.packing = True
    drawn = tokenize_split(recipe.data, tokenizer, "train", draw=stream_draw(recipe, global_batch=2))
    lengths = drawn.columns("length")["length"]
    assert lengths.sum() >= 2 * 2 * 32 > lengths[:-1].sum()  # stops at the example that reaches 4 × max_length tokens


def test_streamed_rows_are_drawn_once_and_read_from_the_cache_after(dataset_folder, tokenizer, monkeypatch):
    recipe = streaming_recipe(dataset_folder)
    first = tokenize_split(recipe.data, tokenizer, "train", draw=(6, 0))

    def offline(*args, **kwargs):
        raise AssertionError("the stream was read again")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert token_rows(tokenize_split(recipe.data, tokenizer, "train", draw=(6, 0))) == token_rows(first)


def test_a_streamed_run_resumes_on_the_rows_it_drew_and_cannot_be_extended(dataset_folder, tiny_recipe, tmp_path):
    data = {"source": str(dataset_folder), "task": "completion", "template": "Q: {text}\nA:", "labels": [],
            "streaming": True, "max_eval_examples": 4, "max_length": 32}
    path = tiny_recipe(data=data, train={"max_steps": 4, "batch_size": 2, "save_every": 2})
    whole = CliRunner().invoke(app, ["train", "--recipe", str(path), "--json"])
    assert whole.exit_code == 0, whole.stderr
    report = json.loads(whole.stdout)
    assert report["throughput"]["steps"] == 4 and report["eval"]["examples"] == 4
    assert report["data"]["train"]["examples"] == 8  # 4 steps × 2 rows drawn
    run = tmp_path / "run"
    expected = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    for path_of_step_4 in (run / "checkpoints" / "step-000004", run / "adapter"):
        shutil.rmtree(path_of_step_4)
    (run / "report.json").unlink()  # as if stopped after step 2
    resumed = CliRunner().invoke(app, ["train", "--recipe", str(path), "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == expected
    longer = CliRunner().invoke(app, ["train", "--recipe", str(path), "--resume", "--set", "train.max_steps=6"])
    assert longer.exit_code == 2 and "streaming" in longer.stderr


@pytest.mark.parametrize(("data", "train", "named"), [
    ({}, {"max_steps": 0}, "set [train] max_steps"),
    ({"eval_fraction": 0.1}, {}, "use eval_split"),
    ({"max_eval_examples": 0}, {}, "max_eval_examples"),
    ({"source": "train.jsonl"}, {}, "set streaming = false"),
])
def test_streaming_recipes_that_cannot_plan_are_refused_when_read(data, train, named):
    raw = {"data": {"source": "org/corpus", "streaming": True, "max_eval_examples": 8, **data},
           "train": {"max_steps": 10, **train}}
    with pytest.raises(LorafitError, match=named.replace("[", r"\[").replace("]", r"\]")):
        validate(raw)


def test_txt_files_for_a_task_other_than_text_are_refused_when_read():
    with pytest.raises(LorafitError, match="only task = 'text' reads"):
        validate({"data": {"source": ["a.txt"], "task": "completion"}})
