"""`lorafit info` end to end: printed counts, the --json contract, exit codes, and memory use."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import transformers
from conftest import GPT2_MEDIUM_SHAPE, assert_one_line_error, tiny_config
from typer.testing import CliRunner

from lorafit.cli import app

REPORT_KEYS = {"total_params", "trainable_params", "trainable_ratio", "adapter_bytes", "modules", "memory"}
MAX_RSS_BYTES = 3 * 1024**3

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_config("gpt2").save_pretrained(folder)
    return str(folder)


def info(*args: str):
    return runner.invoke(app, ["info", *args])


def test_prints_gpt3_rank1_trainable_count(gpt3_dir):
    result = info("--model", gpt3_dir, "--rank", "1", "--targets", "q,v")
    assert result.exit_code == 0, result.output
    assert "4,718,592" in result.stdout


def test_json_has_the_report_keys_and_rank8_count(gpt3_dir):
    result = info("--model", gpt3_dir, "--rank", "8", "--targets", "q,v", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert REPORT_KEYS <= report.keys()
    assert report["trainable_params"] == 37_748_736
    assert {"name", "shape", "lora_params"} <= report["modules"][0].keys()
    assert {"lora_estimate", "full_finetune_estimate"} <= report["memory"].keys()
    activations = report["memory"]["activations"]  # batch 16 × 128 tokens, the recipe defaults
    assert (activations["rows"], activations["length"]) == (16, 128)
    assert activations["total"] > activations["checkpointed"] > 0


def test_gpt2_medium_rank4(tmp_path):
    transformers.GPT2Config(**GPT2_MEDIUM_SHAPE).save_pretrained(tmp_path)
    result = info("--model", str(tmp_path), "--rank", "4", "--targets", "q,v", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["trainable_params"] == 393_216


MEASURE = """
import json, resource, subprocess, sys
child = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
print(json.dumps({"rc": child.returncode, "stdout": child.stdout, "stderr": child.stderr, "peak_kib": peak_kib}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_gpt3_shape_runs_in_well_under_3gb(gpt3_dir):
    command = [sys.executable, "-m", "lorafit.cli", "info", "--model", gpt3_dir, "--rank", "1", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    measured = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, env=env)
    run = json.loads(measured.stdout)
    assert run["rc"] == 0, run["stderr"]
    assert json.loads(run["stdout"])["trainable_params"] == 4_718_592
    assert run["peak_kib"] * 1024 < MAX_RSS_BYTES


def test_missing_model_folder_is_one_line_exit_2(tmp_path):
    line = assert_one_line_error(info("--model", str(tmp_path / "missing")))
    assert "missing" in line


def test_unknown_target_is_one_line_naming_the_valid_ones(tiny_dir):
    line = assert_one_line_error(info("--model", tiny_dir, "--targets", "q,query"))
    assert "query" in line
    for name in ("q", "k", "v", "o", "up", "down"):
        assert name in line


def test_recipe_and_model_together_is_exit_2(tiny_dir, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[model]\nname = "{tiny_dir}"\n', encoding="utf-8")
    assert_one_line_error(info("--recipe", str(recipe), "--model", tiny_dir))


def test_neither_recipe_nor_model_is_exit_2():
    assert_one_line_error(info())


def test_rank_below_one_is_exit_2(tiny_dir):
    assert info("--model", tiny_dir, "--rank", "0").exit_code == 2


def test_recipe_supplies_model_and_lora_settings(tiny_dir, tmp_path):
    config = tiny_config("gpt2")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[model]\nname = "{tiny_dir}"\n[lora]\nrank = 2\ntargets = ["q", "v"]\n', encoding="utf-8")
    result = info("--recipe", str(recipe), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["trainable_params"] == config.n_layer * 2 * 2 * (config.n_embd + config.n_embd)
    assert report["lora"]["rank"] == 2


def test_info_on_a_mixture_of_experts_model_counts_the_experts_and_names_what_all_linear_leaves_out(tmp_path):
    tiny_config("mixtral").save_pretrained(tmp_path)
    result = info("--model", str(tmp_path), "--targets", "all-linear", "--rank", "2")
    assert result.exit_code == 0, result.output
    assert "model.layers.0.mlp.experts.gate_up_proj" in result.stdout and "48 x 32 (4 experts)" in result.stdout
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert any("all-linear adapts the experts' stacked weights too (4 in all" in line for line in notes), notes
    assert any("mlp.gate (MixtralTopKRouter) ×2" in line for line in notes), notes
    report = json.loads(info("--model", str(tmp_path), "--targets", "all-linear", "--rank", "2", "--json").stdout)
    assert len(report["notes"]) == 3  # the experts, the routers left out, no dropout on the experts
    stacks = [row for row in report["modules"] if row.get("experts") == 4]
    assert len(stacks) == 4 and sum(row["lora_params"] for row in stacks) == 2 * 4 * 2 * ((48 + 32) + (32 + 24))
