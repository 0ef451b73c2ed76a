"""AdamW over the LoRA parameters (LoRA+ gives B its own group) and the learning-rate schedule."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lorafit.messages import note
from lorafit.recipe import TrainSection


def build_optimizer(model: nn.Module, settings: TrainSection, total_steps: int) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW over the trainable parameters and the recipe's learning-rate schedule, which scales every group."""
    optimizer = torch.optim.AdamW(parameter_groups(model, settings), lr=settings.lr,
                                  weight_decay=settings.weight_decay, foreach=True)
    schedule = partial(lr_factor, warmup=settings.warmup_steps, total=total_steps, schedule=settings.schedule)
    return optimizer, LambdaLR(optimizer, schedule)


def note_long_warmup(settings: TrainSection, total_steps: int, console) -> None:
    """Say so when warmup outlasts the run: its learning rate never reaches [train] lr."""
    if settings.warmup_steps >= total_steps:
        peak = lr_factor(total_steps - 1, warmup=settings.warmup_steps, total=total_steps, schedule=settings.schedule)
        note(f"[train] warmup_steps = {settings.warmup_steps} is not shorter than the run's {total_steps} steps, so the "
             f"learning rate never reaches [train] lr (its last step runs at {peak:.0%} of it); lower warmup_steps",
             console)


def parameter_groups(model: nn.Module, settings: TrainSection) -> list[dict]:
    """One group at lr; with LoRA+ (Hayou et al. 2024, arXiv 2402.12354) the B matrices in a second at lr × ratio."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not settings.loraplus_lr_ratio:
        return [{"params": [p for _, p in trainable]}]
    is_b = [name.rsplit(".", 1)[-1] == "lora_B" for name, _ in trainable]
    return [
        {"params": [p for (_, p), b in zip(trainable, is_b) if not b]},
        {"params": [p for (_, p), b in zip(trainable, is_b) if b], "lr": settings.lr * settings.loraplus_lr_ratio},
    ]


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup from 0, then constant, linear decay to 0, or cosine decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return max(0.0, 1.0 - progress)
