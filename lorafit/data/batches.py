"""Tokenized rows -> padded batches, and which positions of a batch carry loss."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from lorafit.data.tasks import IGNORE


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row in the batch; padding gets attention 0 and label IGNORE.

    A row's input_ids and labels are lists or NumPy arrays (as `TokenRows` reads them). No rows give one row
    with no supervised token: a rank whose share of a step is empty still runs a forward and backward, so that
    it makes the same collective calls as the others. Packed sequences (rows with `row_lengths`, see
    lorafit.data.packing) get position ids restarting at each packed row instead of an attention mask; their
    padding counts as one more row, which no real token attends to.
    """
    rows = rows or [{"input_ids": [pad_id, pad_id], "labels": [IGNORE, IGNORE]}]
    longest = max(len(row["input_ids"]) for row in rows)
    input_ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    labels = np.full((len(rows), longest), IGNORE, dtype=np.int64)
    attention_mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, row in enumerate(rows):
        length = len(row["input_ids"])
        input_ids[i, :length] = row["input_ids"]
        labels[i, :length] = row["labels"]
        attention_mask[i, :length] = 1
    labels = torch.from_numpy(labels)
    positions, targets = supervised_positions(labels)
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": labels, "positions": positions, "targets": targets}
    if "row_lengths" in rows[0]:
        return {**batch, "position_ids": packed_position_ids(rows, longest)}
    return {**batch, "attention_mask": torch.from_numpy(attention_mask)}


class TokenRows:
    """A split's tokenized rows, left in its memory-mapped Arrow table and read a batch at a time.

    `rows[indices]` gives [{input_ids, labels}] as NumPy views of the Arrow buffers: no Python list per token,
    and nothing of the split in memory beyond the rows asked for.
    """

    def __init__(self, examples):
        self.examples = examples.select_columns(["input_ids", "labels"]).with_format("arrow")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, indices) -> list[dict]:
        indices = [int(index) for index in indices]
        rows = []
        # record batch by record batch: slices of the table's own buffers, whose offsets start where the slice does
        for batch in self.examples[indices].to_batches() if indices else []:
            ids, labels = batch.column("input_ids"), batch.column("labels")
            offsets = ids.offsets.to_numpy()
            offsets = offsets - offsets[0]
            flat_ids, flat_labels = ids.flatten().to_numpy(), labels.flatten().to_numpy()
            rows += [{"input_ids": flat_ids[start:stop], "labels": flat_labels[start:stop]}
                     for start, stop in zip(offsets[:-1], offsets[1:])]
        return rows


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


def supervised_counts(labels: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Supervised tokens of each row of a labels column (Arrow lists laid end to end), by supervised_mask's rule.

    Read from the Arrow buffers without building a tensor (or a list) per row; tokenizing stores the result
    as each row's `supervised` column, so a run never reads the labels to count them.
    """
    column = labels.combine_chunks() if isinstance(labels, pa.ChunkedArray) else labels
    offsets = column.offsets.to_numpy().astype(np.int64)
    flat = column.flatten().to_numpy()
    keep = flat != IGNORE
    keep[:1] = False
    keep[offsets[1:-1] - offsets[0]] = False  # a row's first label follows the previous row, which does not predict it
    owner = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    return np.bincount(owner[keep], minlength=len(offsets) - 1).astype(np.int32)


def supervised_count(labels: torch.Tensor) -> int:
    """How many tokens of a batch carry loss: what its summed loss is divided by."""
    return int(supervised_mask(labels).sum())
