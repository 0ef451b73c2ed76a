"""One optimizer step over several micro-batches: every supervised token weighs the same, the whole step's gradient
is clipped, and the speed and memory switches leave the gradients as they were."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import supervised_rows, tiny_model
from torch.optim.lr_scheduler import LambdaLR

from lorafit.data.batches import collate
from lorafit.data.tasks import IGNORE
from lorafit.model.inject import inject_lora, lora_layers
from lorafit.model.loss import SupervisedLoss, loss_sum
from lorafit.recipe import LoraSection
from lorafit.train.step import prepare_model, train_step


def randomize_b(model: torch.nn.Module) -> None:
    """B starts at zero; give it values so that A gets a gradient too."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)


def lora_model_with_nonzero_b() -> torch.nn.Module:
    model = tiny_model("gpt2")
    inject_lora(model, ["q", "v", "o"], rank=2, alpha=4, dropout=0.0)
    randomize_b(model)
    return model  # eval mode: GPT-2's own dropout off, so every pass is deterministic


def assert_same_gradients(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-6)


def independent_gradient(model: torch.nn.Module, rows: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean cross-entropy over every supervised token of all rows, row by row with plain logits."""
    model = copy.deepcopy(model)
    total, count = torch.zeros(()), 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        targets = torch.tensor(row["labels"][1:])
        keep = targets != IGNORE
        total = total + F.cross_entropy(logits[keep], targets[keep], reduction="sum")
        count += int(keep.sum())
    loss = total / count
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def sgd_step(model: torch.nn.Module, micro_batches: list[dict], max_grad_norm: float) -> tuple[float, dict, object]:
    """Run `train_step` with SGD at lr 1, so each parameter moves by exactly minus its gradient; also the norm."""
    from accelerate import Accelerator

    model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    scheduler = LambdaLR(optimizer, lambda step: 1.0)
    accelerator = Accelerator()
    scorer, optimizer = accelerator.prepare(SupervisedLoss(model), optimizer)
    loss, grad_norm = train_step(accelerator, scorer, optimizer, scheduler, micro_batches, max_grad_norm=max_grad_norm)
    after = dict(model.named_parameters())
    return loss.item(), {n: before[n] - after[n].detach() for n in before}, grad_norm


# ---------------------------------------------------------------- accumulation and clipping


@pytest.mark.parametrize("split", [[8], [2, 2, 2, 2], [1, 3, 4]])
def test_accumulated_step_weights_every_supervised_token_alike(split):
    model, rows = lora_model_with_nonzero_b(), supervised_rows()
    expected_loss, expected_grad = independent_gradient(model, rows)
    starts = [sum(split[:i]) for i in range(len(split))]
    micro = [collate(rows[s : s + n], pad_id=1) for s, n in zip(starts, split)]
    loss, moved, grad_norm = sgd_step(model, micro, max_grad_norm=0.0)
    assert loss == pytest.approx(expected_loss, rel=1e-5) and grad_norm is None  # nothing clipped, no norm
    assert_same_gradients(moved, expected_grad)


@torch.no_grad()
def mean_token_loss(model: torch.nn.Module, rows: list[dict]) -> float:
    losses = [
        F.cross_entropy(
            model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1],
            torch.tensor(row["labels"][1:]),
            reduction="sum",
        )
        for row in rows
    ]
    return float(sum(losses)) / sum(sum(label != IGNORE for label in row["labels"][1:]) for row in rows)


def test_per_batch_mean_would_differ_so_the_accumulation_test_can_fail():
    """The rows' token counts differ enough that averaging micro-batch means gives another loss."""
    model, rows = lora_model_with_nonzero_b(), supervised_rows()
    batch_means = [mean_token_loss(model, rows[s : s + 2]) for s in range(0, 8, 2)]
    assert abs(sum(batch_means) / 4 - mean_token_loss(model, rows)) > 1e-3


def test_accumulated_step_clips_the_whole_steps_gradient():
    model, rows = lora_model_with_nonzero_b(), supervised_rows()
    _, grad = independent_gradient(model, rows)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grad.values()))
    max_norm = float(norm) / 10
    _, moved, grad_norm = sgd_step(model, [collate(rows[s : s + 2], pad_id=1) for s in range(0, 8, 2)],
                                   max_grad_norm=max_norm)
    assert float(grad_norm) == pytest.approx(float(norm), rel=1e-4)  # the norm before clipping
    for name, g in grad.items():
        torch.testing.assert_close(moved[name], g * (max_norm / norm), rtol=1e-3, atol=1e-7)


# ---------------------------------------------------------------- speed and memory switches


def trunk_gradient(switches: dict, batch: dict) -> dict[str, torch.Tensor]:
    """Gradients of A and B for one batch, after `prepare_model` with the given switches; all dropout off."""
    model = tiny_model("gpt2").train()
    prepare_model(model, LoraSection(rank=2, alpha=4, dropout=0.0, targets=["q", "v"]), **switches)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    randomize_b(model)
    summed, _ = loss_sum(model, batch)
    summed.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("switch", ["gradient_checkpointing", "compile"])
def test_speed_and_memory_switches_keep_the_gradients(switch):
    batch = collate(supervised_rows(), pad_id=1)
    expected = trunk_gradient({}, batch)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    actual = trunk_gradient({switch: True}, batch)
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    assert compiled == (switch == "compile")
    assert actual.keys() == expected.keys()
    assert_same_gradients(actual, expected)


def test_the_loop_reads_the_loss_from_the_device_once_per_log_step(tiny_recipe, monkeypatch):
    """Reading a device tensor makes the host wait for the step: allowed at log and save steps only."""
    import io

    from rich.console import Console

    import lorafit.train.loop as train_module
    from lorafit.recipe_file import load_recipe

    reads = []
    real_step = train_module.train_step

    class Counted(torch.Tensor):
        def item(self):
            reads.append(1)
            return super().item()

    def counted_step(*args, **kwargs):
        loss, grad_norm = real_step(*args, **kwargs)
        return loss.as_subclass(Counted), grad_norm

    monkeypatch.setattr(train_module, "train_step", counted_step)
    recipe = load_recipe(tiny_recipe(train={"max_steps": 8, "log_every": 4, "save_every": 0, "batch_size": 2},
                                     data={"max_eval_examples": 2}))
    train_module.train(recipe, console=Console(file=io.StringIO()))
    assert len(reads) == 2  # steps 4 and 8
