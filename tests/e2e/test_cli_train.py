"""`lorafit train` on the command line: help, --set, --output, --json, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, assert_one_line_error
from typer.testing import CliRunner

from lorafit.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("train", ["--recipe", "--output", "--resume", "--set", "--json"]),
        ("eval", ["--recipe", "--adapter", "--model", "--split", "--json"]),
        ("merge", ["base", "adapter", "out", "--force", "--json"]),
        ("info", ["--recipe", "--model", "--rank", "--alpha", "--targets", "--dtype", "--json"]),
    ],
)
def test_help_exits_zero_and_lists_the_documented_options(command, options):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert [option for option in options if option not in result.stdout.lower()] == []


def test_set_changes_the_run(tiny_recipe, tmp_path):
    path = tiny_recipe(train={"max_steps": 6})
    result = runner.invoke(
        app, ["train", "--recipe", str(path), "--set", "train.max_steps=2", "--set", "train.log_every=1"]
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["throughput"]["steps"] == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_output_overrides_the_recipes_output_dir_relative_to_the_cwd(tiny_recipe, tmp_path, monkeypatch):
    path = tiny_recipe(train={"max_steps": 1})
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    result = runner.invoke(app, ["train", "--recipe", str(path), "--output", "elsewhere/run"])
    assert result.exit_code == 0, result.stderr
    run = tmp_path / "cwd" / "elsewhere" / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "report.json").is_file()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--set", "train.lr"], "section.key=value"),
        (["--set", "train.learning_rat=1e-3"], "learning_rat"),
        (["--set", "lora.rank=0"], "[lora] rank"),
    ],
)
def test_bad_set_is_one_line_and_exit_two(tiny_recipe, tmp_path, args, named):
    result = runner.invoke(app, ["train", "--recipe", str(tiny_recipe()), *args], terminal_width=400)
    assert named in assert_one_line_error(result)
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_json_prints_only_the_report_on_stdout(tiny_recipe, tmp_path):
    path = tiny_recipe(train={"max_steps": 1})
    completed = subprocess.run(
        [sys.executable, "-m", "lorafit.cli", "train", "--recipe", str(path), "--json"],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    printed = json.loads(completed.stdout)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert {key: printed[key] for key in report} == report
    assert printed["adapter"] == str(tmp_path / "run" / "adapter")
    assert "eval after training" in completed.stderr
    assert "training" in completed.stderr
    # the one readiness line: GPT-2's fused q/v adapter loads in peft, llama.cpp takes it as GGUF, vLLM/SGLang never
    (serving,) = [line for line in completed.stderr.splitlines() if line.startswith("serving:")]
    assert serving.startswith("serving: ready as written for peft; llama.cpp after `lorafit export ")
    assert serving.endswith("not as an adapter for vLLM, SGLang (lorafit export --check-only says why)")


def test_missing_recipe_is_exit_two(tmp_path):
    result = runner.invoke(app, ["train", "--recipe", str(tmp_path / "nope.toml")])
    assert "does not exist" in assert_one_line_error(result)


def test_shipped_demo_recipe_learns_the_task(tmp_path):
    """The offline default through the CLI, shortened: held-out accuracy climbs well above chance."""
    recipe = REPO / "recipes" / "tiny-sst2.toml"
    shorter = ["--set", "train.max_steps=300", "--set", "data.max_eval_examples=200", "--set", "train.save_every=0"]
    result = runner.invoke(app, ["train", "--recipe", str(recipe), "--output", str(tmp_path / "run"), *shorter, "--json"])
    assert result.exit_code == 0, result.stderr
    evaluation = json.loads(result.stdout)["eval"]
    assert evaluation["before"]["accuracy"] < 0.6
    assert evaluation["accuracy"] >= 0.75
