"""Issue 29: lorafit's training step is peft + torch AdamW, step after step, on the same rows.

Real-data accuracy was compared with peft's; what could make lorafit train differently is the step itself (loss
normalisation, AdamW groups and weight decay, clipping, the schedule, LoRA's scaling). Here both start from the
same A (B = 0) and take the same batches of rows of different lengths and label counts; after several steps
their LoRA weights must agree. What is left to differ between the two is then the order of the rows (the step
plan) and chance, which bench job r measures on real data.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from conftest import PEFT_TARGETS, supervised_rows, tiny_model
from peft import LoraConfig, get_peft_model

from lorafit.data.batches import collate
from lorafit.data.plan import StepRows
from lorafit.model.loss import SupervisedLoss
from lorafit.recipe import LoraSection, TrainSection
from lorafit.train.step import distribute, prepare_model, train_step

STEPS, BATCH, RANK, ALPHA = 8, 4, 4, 8


def peft_steps(model: torch.nn.Module, layers: dict, batches: list[dict], settings: TrainSection) -> dict:
    """peft LoRA from lorafit's starting A, trained with transformers' loss, clipping and torch AdamW."""
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=PEFT_TARGETS["llama"])
    reference = get_peft_model(model, config)
    with torch.no_grad():
        for path, layer in layers.items():
            reference.get_submodule(f"base_model.model.{path}").lora_A["default"].weight.copy_(layer.lora_A)
    trainable = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / settings.max_steps)
    for batch in batches:
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
        reference(**inputs).loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return {path: reference.get_submodule(f"base_model.model.{path}") for path in layers}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lorafit_steps_match_peft_and_torch_adamw(weight_decay):
    settings = TrainSection(max_steps=STEPS, batch_size=BATCH, lr=2e-2, schedule="linear", weight_decay=weight_decay,
                            max_grad_norm=0.5)  # small enough that clipping acts on most steps
    rows = supervised_rows()
    plan = StepRows([len(row["input_ids"]) for row in rows], BATCH, seed=0, group_by_length=False)
    batches = [collate([rows[i] for i in plan.rows(step)], pad_id=0) for step in range(STEPS)]

    model = tiny_model("llama").train()
    layers = prepare_model(model, LoraSection(rank=RANK, alpha=ALPHA, dropout=0.0, targets=["q", "v"]))
    reference = peft_steps(tiny_model("llama").train(), layers, batches, settings)

    accelerator = Accelerator(cpu=True)
    scorer, optimizer, scheduler = distribute(accelerator, SupervisedLoss(model), settings, STEPS)
    for batch in batches:
        train_step(accelerator, scorer, optimizer, scheduler, [batch], max_grad_norm=settings.max_grad_norm)

    for path, layer in layers.items():
        assert layer.lora_B.abs().max() > 1e-3  # the steps moved B away from its zero start
        torch.testing.assert_close(layer.lora_A, reference[path].lora_A["default"].weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.lora_B, reference[path].lora_B["default"].weight, rtol=1e-4, atol=1e-5)
