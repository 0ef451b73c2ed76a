"""Checkpoints restore training exactly, hold no pickles, and only complete ones are ever picked."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from torch.optim.lr_scheduler import LambdaLR

from lorafit.adapter.save import adapter_files
from lorafit.errors import LorafitError
from lorafit.model.inject import inject_lora
from lorafit.train.checkpoint import STATE_TENSORS, RunState, latest_checkpoint, load_checkpoint, save_checkpoint

PROGRESS = RunState(data_fingerprint="abc", global_batch=4, eval_before={"loss": 1.25}, tokens=96, train_seconds=0.5)
MARKER = {"marker.json": b"{}"}  # stands in for the adapter's files


def training_setup(seed: int):
    """Tiny GPT-2 with LoRA (dropout on, so steps draw random numbers), AdamW and a decaying schedule."""
    model = tiny_model("gpt2")
    torch.manual_seed(seed)  # a different seed gives different LoRA A, so a restore must overwrite it
    inject_lora(model, ["q", "v"], rank=4, alpha=8.0, dropout=0.2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.01)
    scheduler = LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model.train(), optimizer, scheduler


def one_step(model, optimizer, scheduler) -> None:
    tokens = torch.randint(2, 128, (2, 10))  # drawn from the global RNG, like dropout
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def lora_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def optimizer_moments(optimizer) -> dict[tuple[int, str], torch.Tensor]:
    state = optimizer.state_dict()["state"]
    return {(i, key): torch.as_tensor(value).clone() for i, values in state.items() for key, value in values.items()}


def random_draws() -> tuple:
    return torch.rand(5), random.random(), np.random.rand(3)


def assert_same_tensors(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key, tensor in left.items():
        assert torch.equal(tensor, right[key]), key


def test_restore_continues_exactly_like_the_uninterrupted_run(tmp_path):
    """Weights, AdamW moments, schedule and every RNG come back, so the next step matches bit for bit."""
    model, optimizer, scheduler = training_setup(seed=1)
    for _ in range(3):
        one_step(model, optimizer, scheduler)
    folder = save_checkpoint(tmp_path, 3, model, optimizer, scheduler, PROGRESS, MARKER)
    saved_weights, saved_moments = lora_state(model), optimizer_moments(optimizer)
    saved_schedule = scheduler.state_dict()
    one_step(model, optimizer, scheduler)
    expected_weights, expected_draws = lora_state(model), random_draws()

    model2, optimizer2, scheduler2 = training_setup(seed=2)
    some_a = "transformer.h.0.attn.c_attn.lora_A"
    assert not torch.equal(lora_state(model2)[some_a], saved_weights[some_a])  # so the restore must overwrite it
    step, progress = load_checkpoint(folder, model2, optimizer2, scheduler2)

    assert (step, progress) == (3, PROGRESS)
    assert_same_tensors(lora_state(model2), saved_weights)
    assert_same_tensors(optimizer_moments(optimizer2), saved_moments)
    assert {key for _, key in saved_moments} == {"step", "exp_avg", "exp_avg_sq"}
    assert scheduler2.state_dict() == saved_schedule
    assert scheduler2.get_last_lr() == pytest.approx([1e-2 / 4])
    one_step(model2, optimizer2, scheduler2)
    assert_same_tensors(lora_state(model2), expected_weights)
    draws = random_draws()
    assert torch.equal(draws[0], expected_draws[0])
    assert draws[1] == expected_draws[1]
    assert np.array_equal(draws[2], expected_draws[2])


def test_every_rank_gets_its_own_rng_back_and_new_ranks_take_rank_0s(tmp_path, monkeypatch):
    """Two ranks' RNG states saved (the gather faked); each rank's next draws are its own after loading."""
    import lorafit.train.checkpoint as checkpoint

    model, optimizer, scheduler = training_setup(seed=1)
    states, draws = [], []
    for seed in (10, 11):  # the generators of rank 0 and rank 1
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        states.append(checkpoint.capture_rng())
        draws.append(random_draws())
    monkeypatch.setattr(checkpoint, "all_gather_objects", lambda mine: states)
    folder = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, PROGRESS, MARKER)
    for rank, owner in ((1, 1), (0, 0), (2, 0)):  # rank 2 is new since the save
        load_checkpoint(folder, model, optimizer, scheduler, rank=rank)
        tensors, python, numbers = random_draws()
        assert torch.equal(tensors, draws[owner][0]) and python == draws[owner][1], rank
        assert np.array_equal(numbers, draws[owner][2]), rank


def test_checkpoint_folder_holds_the_adapter_and_no_pickles(tmp_path):
    model, optimizer, scheduler = training_setup(seed=1)
    one_step(model, optimizer, scheduler)

    files = adapter_files(model, base_model="tiny", targets=["q", "v"])
    folder = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, PROGRESS, files)
    assert folder == tmp_path / "checkpoints" / "step-000001"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/lorafit.json",
        "training_state.json",
        "training_state.safetensors",
    ]
    for path in folder.rglob("*"):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(str(path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]  # no temp folder left


def test_unreadable_checkpoint_is_refused_with_a_way_out(tmp_path):
    model, optimizer, scheduler = training_setup(seed=1)
    one_step(model, optimizer, scheduler)
    folder = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, PROGRESS, MARKER)
    state = folder / STATE_TENSORS
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(LorafitError, match="step-000001 is unreadable.*remove it to resume from the one before"):
        load_checkpoint(folder, *training_setup(seed=1))


def test_checkpoint_of_another_model_shape_is_refused(tmp_path):
    model, optimizer, scheduler = training_setup(seed=1)
    folder = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, PROGRESS, MARKER)
    other = tiny_model("gpt2")
    inject_lora(other, ["q", "v"], rank=2, alpha=8.0)
    other_optimizer = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
    with pytest.raises(LorafitError, match="does not fit"):
        load_checkpoint(folder, other, other_optimizer, LambdaLR(other_optimizer, lambda step: 1.0))


def test_latest_checkpoint_picks_the_highest_complete_step(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for name in ("step-000003", "step-999999", "step-1000000", "step-000012"):
        (checkpoints / name).mkdir(parents=True)
    assert latest_checkpoint(tmp_path) == checkpoints / "step-1000000"  # by number, not by spelling


def test_latest_checkpoint_ignores_temporary_and_foreign_entries(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step-000006").mkdir(parents=True)
    for name in (".step-000009.k2j3h4.tmp", ".step-000009.x8y7.old", "step-12", "step-abcdef", "step-000010-copy"):
        (checkpoints / name).mkdir()
    (checkpoints / "step-000015").write_text("a file, not a checkpoint folder")
    assert latest_checkpoint(tmp_path) == checkpoints / "step-000006"


def test_latest_checkpoint_of_a_fresh_run_is_none(tmp_path):
    assert latest_checkpoint(tmp_path / "never-created") is None
    (tmp_path / "checkpoints").mkdir()
    assert latest_checkpoint(tmp_path) is None


def test_a_checkpoint_of_weights_that_are_no_longer_finite_is_never_written(tmp_path):
    """So that "the last good checkpoint" a diverged run names is one that resumes."""
    model, optimizer, scheduler = training_setup(seed=0)
    one_step(model, optimizer, scheduler)
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler, PROGRESS, MARKER)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")
    with pytest.raises(LorafitError, match=r"became NaN or inf at step 2; .*the last good checkpoint is step-000001"):
        save_checkpoint(tmp_path, 2, model, optimizer, scheduler, PROGRESS, MARKER)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
