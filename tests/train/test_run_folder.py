"""One short training run: the run folder it writes (checkpoints, metrics, report), that it changed only A and B,
and that a second fresh run into it is refused."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import pytest
import torch
import transformers
from conftest import TINY_MODEL, assert_one_line_error, snapshot, write_jsonl, write_recipe
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

import lorafit.model.inject as inject_module
from lorafit.adapter.load import load_adapter
from lorafit.cli import app
from lorafit.model.inject import inject_lora, lora_layers
from lorafit.recipe_file import load_recipe
from lorafit.train.loop import train
from lorafit.train.optimizer import lr_factor

RANK = 4
STEPS = 6
LOG_EVERY = 4
SAVE_EVERY = 4
WARMUP = 2
LR = 1e-3
REPORT_KEYS = {
    "total_params",
    "trainable_params",
    "trainable_ratio",
    "adapter_bytes",
    "modules",
    "memory",
    "throughput",
    "eval",
    "device",
}
runner = CliRunner()


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's own tensors, under the names a plain transformers model gives them."""
    return {
        name.replace(".base.", "."): tensor
        for name, tensor in model.state_dict().items()
        if ".lora_A" not in name and ".lora_B" not in name
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run on the shipped tiny model; the trained model and A at injection time are kept for inspection."""
    folder = tmp_path_factory.mktemp("trained")
    path = write_recipe(
        folder,
        train={"max_steps": STEPS, "log_every": LOG_EVERY, "save_every": SAVE_EVERY, "warmup_steps": WARMUP, "lr": LR},
    )
    recipe = load_recipe(path)
    captured = {}

    def recording_inject(model, *args, **kwargs):
        layers = inject_lora(model, *args, **kwargs)
        captured["model"] = model
        captured["initial_A"] = {name: layer.lora_A.detach().clone() for name, layer in layers.items()}
        return layers

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inject_module, "inject_lora", recording_inject)  # what wrap_targets calls
        report = train(recipe, console=quiet())
    return {"recipe": recipe, "run": Path(recipe.output.dir), "report": report, "recipe_path": path, **captured}


@pytest.fixture(scope="module")
def tiny_shape() -> transformers.GPT2Config:
    return transformers.AutoConfig.from_pretrained(TINY_MODEL)


# ---------------------------------------------------------------- the run folder


def test_run_folder_holds_exactly_the_documented_entries(trained):
    run = trained["run"]
    assert {p.name for p in run.iterdir()} == {
        "adapter", "checkpoints", "recipe.toml", "metrics.jsonl", "report.json", "lorafit-run.json", "lorafit.lock",
        "curves.png",
    }
    assert {p.name for p in (run / "adapter").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorafit.json",
    }


def test_checkpoints_are_saved_every_save_every_steps_and_at_the_last(trained):
    checkpoints = sorted(p.name for p in (trained["run"] / "checkpoints").iterdir())
    expected = [f"step-{step:06d}" for step in [*range(SAVE_EVERY, STEPS, SAVE_EVERY), STEPS]]
    assert checkpoints == expected
    assert (trained["run"] / "checkpoints" / expected[0] / "adapter" / "adapter_model.safetensors").is_file()


def test_no_temporary_files_are_left_in_the_run_folder(trained):
    leftovers = [p for p in trained["run"].rglob("*") if p.name.startswith(".") or p.name.endswith((".tmp", ".old"))]
    assert leftovers == []


def test_saved_recipe_loads_back_to_the_run_recipe(trained):
    assert load_recipe(trained["run"] / "recipe.toml") == trained["recipe"]


def test_metrics_has_one_line_per_log_step_and_the_last(trained):
    lines = (trained["run"] / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    expected_steps = sorted({*range(LOG_EVERY, STEPS + 1, LOG_EVERY), STEPS})
    assert [r["step"] for r in records] == expected_steps
    for record in records:
        assert set(record) == {"step", "loss", "lr", "tokens_per_s", "grad_norm", "memory_bytes"}
        assert record["grad_norm"] > 0 and record["memory_bytes"] > 0
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert record["tokens_per_s"] > 0


def test_metrics_lr_follows_the_schedule(trained):
    # The logged lr is the one the scheduler holds after `step` updates, i.e. for the next update.
    records = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        expected = LR * lr_factor(record["step"], warmup=WARMUP, total=STEPS, schedule="linear")
        assert record["lr"] == pytest.approx(expected, abs=1e-12)


def test_report_json_is_the_returned_report_with_every_documented_key(trained):
    on_disk = json.loads((trained["run"] / "report.json").read_text())
    assert REPORT_KEYS <= set(on_disk)
    assert on_disk == json.loads(json.dumps(trained["report"], default=str))


def test_report_counts_match_the_model_config(trained, tiny_shape):
    report = trained["report"]
    d, layers = tiny_shape.n_embd, tiny_shape.n_layer
    base = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    base_params = sum(p.numel() for p in base.parameters())
    # q and v each get A [r, d] and B [d, r]: 4·r·d per layer.
    lora_params = layers * 4 * RANK * d
    assert report["trainable_params"] == lora_params
    assert report["total_params"] == base_params + lora_params
    assert report["trainable_ratio"] == pytest.approx(lora_params / (base_params + lora_params))
    assert report["modules"] == [
        {"name": f"transformer.h.{i}.attn.c_attn", "shape": [3 * d, d], "lora_params": 4 * RANK * d}
        for i in range(layers)
    ]


def test_report_adapter_bytes_is_the_file_size(trained):
    size = os.path.getsize(trained["run"] / "adapter" / "adapter_model.safetensors")
    assert trained["report"]["adapter_bytes"] == size


def test_report_memory_throughput_eval_and_device(trained):
    report = trained["report"]
    memory = report["memory"]
    assert memory["peak_bytes"] > 0 and isinstance(memory["peak_kind"], str)
    for key in ("lora_estimate", "full_finetune_estimate"):
        assert memory[key]["total"] == sum(memory[key][part] for part in ("weights", "gradients", "optimizer"))
    assert memory["lora_estimate"]["total"] < memory["full_finetune_estimate"]["total"]
    throughput = report["throughput"]
    assert throughput["steps"] == STEPS
    assert throughput["tokens_per_s"] > 0 and throughput["wall_s"] > 0
    evaluation = report["eval"]
    assert evaluation["examples"] == 16
    assert evaluation["perplexity"] == pytest.approx(math.exp(evaluation["loss"]))
    assert 0.0 <= evaluation["accuracy"] <= 1.0
    assert isinstance(report["device"], str) and report["device"]


# ---------------------------------------------------------------- only A and B change


def test_training_leaves_every_base_tensor_bit_identical(trained):
    fresh = base_state(transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL))
    after = base_state(trained["model"])
    assert set(after) == set(fresh)
    changed = [name for name in fresh if not torch.equal(fresh[name], after[name])]
    assert changed == []


def test_only_lora_parameters_are_trainable(trained):
    trainable = {name for name, p in trained["model"].named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith((".lora_A", ".lora_B")) for name in trainable)


def test_training_moves_every_A_and_B(trained):
    for name, layer in lora_layers(trained["model"]).items():
        assert not torch.equal(layer.lora_A.detach(), trained["initial_A"][name]), name
        assert layer.lora_B.detach().abs().max() > 0, name  # B starts at zero


def test_saved_adapter_reproduces_the_trained_model(trained):
    tensors = load_file(trained["run"] / "adapter" / "adapter_model.safetensors")
    assert tensors and all(".lora_A." in key or ".lora_B." in key for key in tensors)
    rebuilt = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    load_adapter(rebuilt, trained["run"] / "adapter")
    rebuilt.eval()  # after loading: the LoRA layers it adds carry dropout
    model = trained["model"].eval()
    ids = torch.randint(0, rebuilt.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits)


def test_prepare_model_swaps_in_pytorchs_gelu_kernel(trained):
    activations = {type(m).__name__ for m in trained["model"].modules() if "GELU" in type(m).__name__}
    assert activations == {"GELU"}


# ---------------------------------------------------------------- an existing run is never overwritten


def test_fresh_train_into_an_existing_run_is_refused_and_changes_nothing(trained):
    before = snapshot(trained["run"])
    result = runner.invoke(app, ["train", "--recipe", str(trained["recipe_path"])])
    line = assert_one_line_error(result)
    assert "already holds a run" in line and "--resume" in line
    assert snapshot(trained["run"]) == before


# ---------------------------------------------------------------- the other tasks write the same run folder


@pytest.mark.parametrize("task", ["completion", "text"])
def test_generative_tasks_train_end_to_end(task, tiny_recipe, tmp_path):
    words = ["cat", "dog", "sun", "rain", "film", "song"]
    if task == "completion":
        rows = [{"prompt": f"Say {w}:", "response": f" {w} {w}"} for w in words]
        fields = {"prompt_field": "prompt", "response_field": "response"}
    else:
        rows = [{"body": f"The {w} is here and the {w} is good."} for w in words]
        fields = {"text_field": "body"}
    source = {
        "train": str(write_jsonl(tmp_path / "train.jsonl", rows)),
        "validation": str(write_jsonl(tmp_path / "valid.jsonl", rows[:3])),
    }
    path = tiny_recipe(
        data={"source": source, "task": task, "template": "{text}", **fields}, train={"max_steps": 2, "batch_size": 2}
    )
    report = train(load_recipe(path), console=quiet())
    assert report["throughput"]["steps"] == 2
    assert report["eval"]["examples"] == 3
    assert "accuracy" not in report["eval"]
    assert report["eval"]["perplexity"] == pytest.approx(math.exp(report["eval"]["loss"]))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and math.isfinite(records[-1]["loss"])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
