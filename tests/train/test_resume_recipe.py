"""`lorafit train --resume -o RUN` continues the run that was started: its own recipe (the one its newest checkpoint
recorded), changed only where a resume may change it, each change printed. A recipe file whose max_steps differs is
not an extension; `--set train.max_steps=N` is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import assert_one_line_error, snapshot, write_recipe
from typer.testing import CliRunner

from lorafit.cli import app

runner = CliRunner()
# The trial, small: a recipe of 6 steps started with --set for 4 steps and 3 evaluation rows.
TRAIN = {"max_steps": 6, "save_every": 1, "log_every": 1, "batch_size": 2, "eval_batch_size": 4, "schedule": "constant"}
STARTED_WITH = ["--set", "train.max_steps=4", "--set", "data.max_eval_examples=3"]
WEIGHTS = "adapter/adapter_model.safetensors"


def train(*args: str):
    return runner.invoke(app, ["train", *args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> Path:
    """The folder of the recipe file and its run, trained to the end without a stop: the reference."""
    folder = tmp_path_factory.mktemp("trial")
    result = train("-r", str(write_recipe(folder, train=TRAIN)), *STARTED_WITH)
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture
def stopped(started, tmp_path) -> Path:
    """A copy of the run, moved to another folder, as a stop after step 2 leaves it: no adapter, no report."""
    run = tmp_path / "run"
    shutil.copytree(started / "run", run)
    for step in (3, 4):
        shutil.rmtree(run / "checkpoints" / f"step-{step:06d}")
    shutil.rmtree(run / "adapter")
    (run / "report.json").unlink()
    return run


def test_resume_needs_no_recipe_and_finishes_the_run_as_it_was_started(started, stopped):
    result = train("--resume", "-o", str(stopped))
    assert result.exit_code == 0, result.output
    assert "resume changes" not in result.output
    reference = json.loads((started / "run" / "report.json").read_text())
    report = json.loads((stopped / "report.json").read_text())
    assert report["throughput"]["steps"] == 4
    assert report["eval"]["examples"] == reference["eval"]["examples"] == 3  # the rows the run started with
    assert report["eval"]["before"] == reference["eval"]["before"]
    assert (stopped / WEIGHTS).read_bytes() == (started / "run" / WEIGHTS).read_bytes()


def test_a_recipe_file_with_another_max_steps_is_refused_not_taken_as_an_extension(started, stopped):
    before = snapshot(stopped)
    line = assert_one_line_error(train("-r", str(started / "recipe.toml"), "--resume", "-o", str(stopped)))
    assert "recipe.toml gives train.max_steps = 6, and the run in" in line and "was started with 4" in line
    assert f"drop --recipe to continue with the run's own recipe (lorafit train --resume -o {stopped})" in line
    assert "pass --set train.max_steps=6" in line
    assert snapshot(stopped) == before


def test_set_trains_the_run_longer_and_every_change_is_printed(stopped):
    result = train("--resume", "-o", str(stopped), "--set", "train.max_steps=5", "--set", "train.log_every=2")
    assert result.exit_code == 0, result.output
    assert "resume changes train.log_every: 1 -> 2 (from --set)" in result.output
    assert "resume changes train.max_steps: 4 -> 5 (from --set)" in result.output
    assert json.loads((stopped / "report.json").read_text())["throughput"]["steps"] == 5


def test_fewer_evaluation_rows_on_resume_are_printed_and_the_end_table_says_the_scores_are_on_other_rows(stopped):
    result = train("--resume", "-o", str(stopped), "--set", "data.max_eval_examples=2")
    assert result.exit_code == 0, result.output
    assert "resume changes data.max_eval_examples: 3 -> 2 (from --set)" in result.output
    report = json.loads((stopped / "report.json").read_text())
    assert (report["eval"]["before"]["examples"], report["eval"]["examples"]) == (3, 2)
    assert report["eval"]["before"]["rows_changed"] is True
    assert f"{report['eval']['before']['loss']:.4f} (on other rows) -> {report['eval']['loss']:.4f}" in result.output
    assert "eval examples" in result.output and "3 -> 2" in result.output


def test_a_recipe_file_may_change_what_a_resume_may_change_and_it_is_printed(started, stopped, tmp_path):
    (tmp_path / "edited").mkdir()
    edited = write_recipe(tmp_path / "edited", train={**TRAIN, "max_steps": 4, "eval_batch_size": 2},
                          data={"max_eval_examples": 3})
    result = train("-r", str(edited), "--resume", "-o", str(stopped), "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"resume changes train.eval_batch_size: 4 -> 2 (from {edited})" in result.output
    assert f"in {stopped}: resume from step-000002" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "lora.rank=2"], "--set lora.rank: a resume cannot change it (it changes what the steps compute)"),
        (["-r", "EDITED"], "gives train.lr = 0.01 where the run in"),
    ],
)
def test_a_change_a_resume_cannot_make_is_refused_naming_where_it_came_from(stopped, tmp_path, args, message):
    (tmp_path / "edited").mkdir()
    edited = write_recipe(tmp_path / "edited", train={**TRAIN, "max_steps": 4, "lr": 1e-2}, data={"max_eval_examples": 3})
    before = snapshot(stopped)
    line = assert_one_line_error(train(*[str(edited) if a == "EDITED" else a for a in args], "--resume", "-o", str(stopped)))
    assert message in line
    assert snapshot(stopped) == before


def test_resume_without_a_run_or_train_without_a_recipe_says_what_to_give(tmp_path):
    line = assert_one_line_error(train("--resume", "-o", str(tmp_path / "none")))
    assert "holds no lorafit run to resume; start one with --recipe PATH" in line
    assert "give --recipe PATH, or --resume --output DIR" in assert_one_line_error(train("-o", str(tmp_path / "x")))
    assert not (tmp_path / "none").exists() and not (tmp_path / "x").exists()
