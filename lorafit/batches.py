"""Tokenized rows -> padded batches, and the rows of each optimizer step.

The step plan is a pure function of (seed, epoch, global batch), so a resumed run sees the same rows,
and so does a run on any number of processes: each rank takes its share of the step's rows.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from lorafit.data import IGNORE
from lorafit.errors import LorafitError
from lorafit.recipe import TrainSection

GROUP_CHUNK = 50  # batches per length-sorted chunk: big enough to group lengths, small enough to stay random


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row in the batch; padding gets attention 0 and label IGNORE.

    No rows give one row with no supervised token: a rank whose share of a step is empty still runs a
    forward and backward, so that it makes the same collective calls as the others. Packed sequences (rows
    with `row_lengths`, see lorafit.packing) get position ids restarting at each packed row instead of an
    attention mask; their padding counts as one more row, which no real token attends to.
    """
    rows = rows or [{"input_ids": [pad_id, pad_id], "labels": [IGNORE, IGNORE]}]
    longest = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        length = len(row["input_ids"])
        input_ids[i, :length] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[i, :length] = torch.as_tensor(row["labels"], dtype=torch.long)
        attention_mask[i, :length] = 1
    positions, targets = supervised_positions(labels)
    batch = {"input_ids": input_ids, "labels": labels, "positions": positions, "targets": targets}
    if "row_lengths" in rows[0]:
        return {**batch, "position_ids": packed_position_ids(rows, longest)}
    return {**batch, "attention_mask": attention_mask}


def packed_position_ids(rows: list[dict], longest: int) -> torch.Tensor:
    """[batch, longest]: 0, 1, ... restarting at every packed row and at the padding after the last one."""
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        padding = longest - len(row["input_ids"])
        pieces = [length for length in [*row["row_lengths"], padding] if length]
        position_ids[i] = torch.cat([torch.arange(length) for length in pieces])
    return position_ids


def supervised_mask(labels: torch.Tensor) -> torch.Tensor:
    """[batch, length - 1]: True where position t's next token (label t + 1) carries loss.

    Position t predicts token t + 1, so a row's first label is never predicted and never counts.
    """
    return labels[:, 1:] != IGNORE


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(where each supervised token is predicted: a flat index into [batch · length] positions, the token) [M], [M].

    collate builds them on the CPU, so the loss selects the predicting hidden states with an index instead of
    a boolean mask on the device (which makes the host wait for the device to count the selected rows).
    """
    mask = supervised_mask(labels)
    row, position = mask.nonzero(as_tuple=True)
    return row * labels.shape[1] + position, labels[:, 1:][mask]


def supervised_counts(examples) -> list[int]:
    """Supervised tokens of each tokenized row, by supervised_mask's rule, from the rows' labels laid end to end.

    Read from the data set's Arrow column without building a tensor (or a list) per row: a 67k-row set takes
    about a tenth of a second at every start, against seconds row by row.
    """
    column = examples.with_format("arrow")["labels"].combine_chunks()  # honours a select()ed subset
    offsets = torch.from_numpy(column.offsets.to_numpy().astype("int64"))
    flat = torch.from_numpy(column.flatten().to_numpy().astype("int64"))
    keep = torch.cat([torch.zeros(1, dtype=torch.bool), supervised_mask(flat[None])[0]])
    keep[offsets[1:-1]] = False  # a row's first label follows the previous row, which does not predict it
    owner = torch.repeat_interleave(torch.arange(len(offsets) - 1), offsets.diff())
    return torch.bincount(owner[keep], minlength=len(offsets) - 1).tolist()


def supervised_count(labels: torch.Tensor) -> int:
    """How many tokens of a batch carry loss: what its summed loss is divided by."""
    return int(supervised_mask(labels).sum())


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of row indices in which rows have similar lengths, to cut padding.

    Shuffle, sort chunks of GROUP_CHUNK batches by length, cut them into batches, shuffle the batches.
    Deterministic for (seed, epoch); every index appears once; the last partial batch is kept.
    """
    rng = random.Random(f"lorafit-batches:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = GROUP_CHUNK * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start:start + chunk], key=lambda index: lengths[index], reverse=True)
        batches.extend(group[i:i + batch_size] for i in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


@dataclass
class StepRows:
    """The rows of each optimizer step: `global_batch` of them, length-grouped, a pure function of (seed, epoch)."""

    lengths: list[int]
    global_batch: int
    seed: int
    _epoch: tuple[int, list[list[int]]] | None = None  # the last epoch asked for, and its steps

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.lengths) / self.global_batch)

    def rows(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, length_grouped_batches(self.lengths, self.global_batch, self.seed, epoch))
        return self._epoch[1][index]


def rank_share(step_rows: list[int], rank: int, world: int, batch_size: int, grad_accum: int) -> list[list[int]]:
    """This rank's `grad_accum` micro-batches of one optimizer step.

    The step's rows are cut into pieces of `batch_size`; micro-batch m of rank r is piece m·world + r. A short
    last step leaves some pieces empty: the rank still runs them (with no supervised token), so every rank
    makes the same collective calls.
    """
    pieces = [step_rows[i : i + batch_size] for i in range(0, len(step_rows), batch_size)]
    return [pieces[m * world + rank] if m * world + rank < len(pieces) else [] for m in range(grad_accum)]


def eval_shares(count: int, rank: int, world: int, batch_size: int) -> list[list[int]]:
    """This rank's evaluation batches of `count` rows (rows rank, rank + world, ...): as many batches on every rank."""
    mine = list(range(rank, count, world))
    batches = math.ceil(math.ceil(count / world) / batch_size)
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(batches)]


def global_batch_split(settings: TrainSection, world: int) -> int:
    """Micro-batches per optimizer step on each process: grad_accum, or what [train] global_batch leaves."""
    if not settings.global_batch:
        return settings.grad_accum
    per_pass = settings.batch_size * world
    if settings.grad_accum != 1 or settings.global_batch % per_pass:
        raise LorafitError(
            f"[train] global_batch = {settings.global_batch} is not a multiple of batch_size {settings.batch_size} × "
            f"{world} processes; change global_batch or batch_size (and leave grad_accum at 1, it is derived)"
        )
    return settings.global_batch // per_pass
