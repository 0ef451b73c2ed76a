"""`lorafit sweep`: one run per rank, a table, sweep.json and sweep.png, and a resume that keeps finished runs."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers
from conftest import TINY_MODEL, assert_one_line_error, snapshot
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.recipe import load_recipe
from lorafit.sweep import run_folder_name

runner = CliRunner()


def sweep_args(recipe, folder, *extra):
    return ["sweep", "--recipe", str(recipe), "--ranks", "1,2", "--output", str(folder), *extra]


@pytest.mark.slow
def test_sweep_over_two_ranks_tabulates_and_resumes_without_retraining_the_finished_rank(tiny_recipe, tmp_path):
    recipe = tiny_recipe(train={"max_steps": 2, "save_every": 1, "log_every": 1}, data={"max_eval_examples": 8})
    folder = tmp_path / "sweep"
    first = runner.invoke(app, sweep_args(recipe, folder), env={"COLUMNS": "200"})
    assert first.exit_code == 0, first.stderr
    assert "trainable" in first.stdout and "peak memory" in first.stdout
    result = json.loads((folder / "sweep.json").read_text())
    config = transformers.AutoConfig.from_pretrained(TINY_MODEL)
    assert [row["value"] for row in result["runs"]] == [1, 2]  # the recipe's values with their types, not text
    for row, rank in zip(result["runs"], (1, 2)):
        assert row["trainable_params"] == 4 * config.n_layer * rank * config.n_embd  # q and v: A and B each
        report = json.loads((folder / f"rank-{rank}" / "report.json").read_text())
        assert load_recipe(folder / f"rank-{rank}" / "recipe.toml").lora.rank == rank
        gained = report["eval"]["accuracy"] - report["eval"]["before"]["accuracy"]
        assert row["gained_per_million_params"] == pytest.approx(gained / (row["trainable_params"] / 1e6))
        assert row["eval_loss"] == report["eval"]["loss"] and row["peak_bytes"] == report["memory"]["peak_bytes"]
    assert (folder / "sweep.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # An interrupted second run: its checkpoint at step 1 is there, its adapter and report are not.
    finished = snapshot(folder / "rank-1")
    uninterrupted = (folder / "rank-2" / "adapter" / "adapter_model.safetensors").read_bytes()
    (folder / "rank-2" / "report.json").unlink()
    shutil.rmtree(folder / "rank-2" / "adapter")
    again = runner.invoke(app, sweep_args(recipe, folder, "--json"))
    assert again.exit_code == 0, again.stderr
    assert "rank = 1: finished" in again.stderr and "rank = 2: resuming" in again.stderr
    assert snapshot(folder / "rank-1") == finished
    assert (folder / "rank-2" / "adapter" / "adapter_model.safetensors").read_bytes() == uninterrupted
    assert [row["value"] for row in json.loads(again.stdout)["runs"]] == [1, 2]


def test_sweep_refuses_a_bad_value_before_training_anything(tiny_recipe, tmp_path):
    result = runner.invoke(app, ["sweep", "--recipe", str(tiny_recipe()), "--key", "lora.alpha", "--values", "8,-1",
                                 "--output", str(tmp_path / "sweep")], terminal_width=400)
    assert "[lora] alpha" in assert_one_line_error(result)
    assert not (tmp_path / "sweep").exists()


def test_sweep_needs_ranks_or_a_key_with_values(tiny_recipe):
    result = runner.invoke(app, ["sweep", "--recipe", str(tiny_recipe()), "--key", "lora.alpha"], terminal_width=400)
    assert "--values" in assert_one_line_error(result)


def test_run_folders_are_named_by_key_and_value():
    assert run_folder_name("lora.rank", "8") == "rank-8"
    assert run_folder_name("lora.targets", '["q", "v"]') == "targets-q_v"
