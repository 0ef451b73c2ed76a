"""LoRA+ (Hayou et al. 2024): B in its own parameter group at lr × ratio, scaled by the schedule like the rest,
and kept through a resume."""

from __future__ import annotations

import json
import shutil

import torch
from conftest import RANK, tiny_model, write_recipe
from safetensors.torch import load_file

from lorafit.model.inject import inject_lora
from lorafit.recipe import TrainSection, load_recipe
from lorafit.train.loop import train
from lorafit.train.optimizer import build_optimizer, lr_factor, note_long_warmup


def test_loraplus_puts_b_in_its_own_group_at_lr_times_ratio():
    model = tiny_model("llama")
    layers = inject_lora(model, ["q", "v"], RANK, 8.0, variant="dora")
    settings = TrainSection(lr=1e-3, loraplus_lr_ratio=16.0, warmup_steps=2, schedule="linear")
    optimizer, scheduler = build_optimizer(model, settings, total_steps=10)
    rest, b_group = optimizer.param_groups
    b_ids = {id(layer.lora_B) for layer in layers.values()}
    assert {id(p) for p in b_group["params"]} == b_ids
    others = {id(p) for layer in layers.values() for p in (layer.lora_A, layer.lora_magnitude)}
    assert {id(p) for p in rest["params"]} == others
    for step in range(5):  # warmup then decay: the schedule scales both groups alike
        assert b_group["lr"] == 16.0 * rest["lr"]
        assert rest["lr"] == 1e-3 * lr_factor(step, warmup=2, total=10, schedule="linear")
        optimizer.step()
        scheduler.step()


def test_without_loraplus_there_is_one_group():
    model = tiny_model("llama")
    inject_lora(model, ["q", "v"], RANK, 8.0)
    optimizer, _ = build_optimizer(model, TrainSection(lr=1e-3), total_steps=4)
    assert len(optimizer.param_groups) == 1


def test_a_resumed_loraplus_run_keeps_its_groups_and_ends_with_the_uninterrupted_adapter(tmp_path):
    from typer.testing import CliRunner

    from lorafit.cli import app

    settings = {"max_steps": 4, "save_every": 2, "batch_size": 2, "log_every": 2, "loraplus_lr_ratio": 8.0,
                "schedule": "linear"}
    whole = tmp_path / "whole"
    whole.mkdir()
    recipe = write_recipe(whole, train=settings, data={"max_eval_examples": 2})
    train(load_recipe(recipe), console=None)
    state = json.loads((whole / "run" / "checkpoints" / "step-000002" / "training_state.json").read_text())
    rest, b_group = state["param_groups"]
    assert b_group["lr"] == 8.0 * rest["lr"] and b_group["initial_lr"] == 8.0 * rest["initial_lr"]

    # The same run stopped after step 2, then resumed.
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "run" / "adapter")
    recipe = write_recipe(resumed, train=settings, data={"max_eval_examples": 2})
    result = CliRunner().invoke(app, ["train", "--recipe", str(recipe), "--resume"])
    assert result.exit_code == 0, result.output
    final = "run/adapter/adapter_model.safetensors"
    expected, got = load_file(whole / final), load_file(resumed / final)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_a_warmup_that_outlasts_the_run_is_said_with_the_share_of_lr_its_last_step_reaches():
    import io

    from rich.console import Console

    said = io.StringIO()
    console = Console(file=said, width=400)
    note_long_warmup(TrainSection(warmup_steps=10), total_steps=11, console=console)
    assert said.getvalue() == ""  # the 11th step runs at the full lr
    note_long_warmup(TrainSection(warmup_steps=19), total_steps=10, console=console)
    last = lr_factor(9, warmup=19, total=10, schedule="linear")  # step 10 of 10, inside the warmup
    assert last == 0.5 and "never reaches [train] lr (its last step runs at 50% of it)" in said.getvalue()
