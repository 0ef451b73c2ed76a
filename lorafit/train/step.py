"""What one training step is, apart from the loop: the model wrapped for LoRA and set up for the launch, and
one AdamW step over a rank's micro-batches (bench/run.py times this too)."""

from __future__ import annotations

from collections.abc import Collection
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from torch import nn

from lorafit.data.batches import supervised_count
from lorafit.lora.adalora import RankAllocator
from lorafit.lora.dropout import keyed_dropout
from lorafit.lora.linear import LoRALinear
from lorafit.model.inject import stores_transposed, wrap_targets
from lorafit.model.load import decoder_blocks, enable_checkpointing, fuse_activations
from lorafit.model.loss import SupervisedLoss
from lorafit.model.masks import is_padded, masks_without_host_reads
from lorafit.model.quantize import quantize_blocks
from lorafit.recipe import LoraSection, TrainSection
from lorafit.train.optimizer import build_optimizer
from lorafit.train.processes import shard_model


def prepare_model(
    model: nn.Module, lora: LoraSection, *, gradient_checkpointing: bool = False, compile: bool = False,
    quantize: str = "none", device: torch.device | None = None,
) -> dict[str, LoRALinear]:
    """Wrap the targets in LoRA layers, freeze the rest, and set up the trunk for a cheap training step.

    `device` is where training runs: 4-bit weights are quantized there, each moved there first.
    """
    layers = wrap_targets(model, lora)
    if quantize == "nf4":  # after injection, so the adapter describes the original (e.g. Conv1D) modules
        quantize_blocks(model, decoder_blocks(model), stores_transposed, device)
    fuse_activations(model)
    if gradient_checkpointing:
        enable_checkpointing(model)
    if compile:
        # Block by block, as torchtune does: every block shares one compiled graph, and the loss code
        # that calls the trunk and the head separately stays as it is. Shapes are symbolic from the start (rows
        # and lengths change every step); the first block, whose input needs no gradient, gets a second graph.
        for block in decoder_blocks(model):
            block.compile(dynamic=True)
    return layers


def distribute(accelerator: Accelerator, scorer: SupervisedLoss, settings: TrainSection, total_steps: int):
    """(scorer, optimizer, scheduler) for the launch: DDP, or FSDP2/HSDP shards with the optimizer built after them.

    The scheduler is not given to accelerate, which would step it once per process per optimizer step.
    """
    if settings.parallel != "ddp" and accelerator.num_processes > 1:
        blocks = decoder_blocks(scorer.model)
        scorer = shard_model(scorer, blocks, accelerator.device, hybrid=settings.parallel == "hsdp",
                             shard_size=settings.shard_size)
        optimizer, scheduler = build_optimizer(scorer, settings, total_steps)
        return scorer, accelerator.prepare_optimizer(optimizer), scheduler
    optimizer, scheduler = build_optimizer(scorer, settings, total_steps)
    scorer, optimizer = accelerator.prepare(scorer, optimizer)
    return scorer, optimizer, scheduler


def train_step(
    accelerator: Accelerator, scorer: nn.Module, optimizer, scheduler, micro_batches: list[dict], *, step: int = 0,
    max_grad_norm: float, supervised: int | None = None, layers: Collection[nn.Module] = (), seed: int = 0,
    ranks: RankAllocator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One AdamW step over this rank's micro-batches: (this rank's part of the step's mean token loss, the
    gradient's norm before clipping, or None without clipping). Both stay on the device: reading one makes the
    host wait for the step.

    Every token of the step weighs alike, whichever rank or micro-batch holds it: `supervised` counts the
    supervised tokens of the whole step on all ranks (by default those of `micro_batches`). The dropout of
    `layers` is keyed by (seed, step, a row's index in the data set (a batch's "rows"), position, layer).
    `ranks`, AdaLoRA's allocator, adds its penalty's gradient and prunes.
    """
    if supervised is None:
        supervised = sum(supervised_count(batch["labels"]) for batch in micro_batches)
    # DDP and FSDP average the gradients over ranks: times the processes, that average is the sum over tokens.
    scale = accelerator.num_processes / max(supervised, 1)
    loss = torch.zeros((), device=accelerator.device)
    for index, batch in enumerate(micro_batches):
        inputs = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items() if k != "rows"}
        last = index == len(micro_batches) - 1
        with (nullcontext() if last else accelerator.no_sync(scorer)), masks_without_host_reads(is_padded(batch)), \
                keyed_dropout(layers, seed, step, batch.get("rows", []), inputs["input_ids"].shape):
            with accelerator.autocast():
                summed = scorer(**inputs)  # SupervisedLoss -> loss_sum (model/loss.py): summed CE of supervised tokens
            accelerator.backward(summed * scale)
        loss += summed.detach() / max(supervised, 1)
    if ranks is not None:
        ranks.orthogonality_gradients()
    grad_norm = accelerator.clip_grad_norm_(scorer.parameters(), max_grad_norm) if max_grad_norm > 0 else None
    optimizer.step()
    if ranks is not None:
        ranks.after_step(step + 1)  # sees the updated weights and their gradients
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm
