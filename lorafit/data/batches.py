"""Tokenized rows -> padded batches, and which positions of a batch carry loss."""

from __future__ import annotations

import torch

from lorafit.data.tasks import IGNORE


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row in the batch; padding gets attention 0 and label IGNORE.

    No rows give one row with no supervised token: a rank whose share of a step is empty still runs a
    forward and backward, so that it makes the same collective calls as the others. Packed sequences (rows
    with `row_lengths`, see lorafit.data.packing) get position ids restarting at each packed row instead of an
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
