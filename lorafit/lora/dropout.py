"""LoRA dropout keyed by the row: a mask is a pure function of (seed, step, row, position, layer, feature).

So a row gets the same mask whichever process or micro-batch computes it, and a run's result does not depend
on the number of processes. Hashes work on 32-bit values held in int64. No Hugging Face knowledge here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

M32 = 0xFFFFFFFF  # hashes below work on 32-bit values held in int64: a product never overflows 63 bits


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply, two rounds) of values in [0, 2^32), elementwise."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    return (x >> 16) ^ x


def dropout_keys(seed: int, step: int, rows: Sequence[int], length: int, device: torch.device) -> torch.Tensor:
    """[len(rows), length] keys, one per (seed, step, row, position): what a keyed dropout mask is drawn from.

    `rows` are the rows' indices in the data set, so a row gets the same masks whichever process or
    micro-batch computes it, and the result does not depend on the process count.
    """
    key = _mix32(torch.tensor([seed & M32], device=device))
    key = _mix32(key ^ (step & M32))
    key = _mix32(key ^ (torch.tensor(list(rows), dtype=torch.long, device=device) & M32))
    return _mix32(key[:, None] ^ torch.arange(length, device=device))


def keyed_keep_mask(keys: torch.Tensor, salt: int, features: int, p: float) -> torch.Tensor:
    """[*keys.shape, features] booleans, True with probability 1 - p, a pure function of (key, salt, feature).

    The position's key times an odd per-feature multiplier, then one xorshift-multiply round: as fast as
    torch's own dropout on a CPU, with no correlation between features above sampling noise.
    """
    position = _mix32(keys ^ (salt & M32))[..., None]
    multiplier = (_mix32(torch.arange(features, device=keys.device) + 0x9E3779B1 & M32) >> 1) | 1
    h = (position * multiplier) & M32
    h = ((h >> 15) ^ h) * 0x2C1B3C6D & M32
    return h >= int(p * 2**32)


def set_dropout_keys(layers, seed: int, step: int, rows: Sequence[int], shape: Sequence[int]) -> None:
    """Key the dropout of every layer for the next forward of a [batch, length] batch of `rows`.

    Rows past len(rows) (the one row of an empty micro-batch) get keys too; their masks touch no loss.
    A layer keeps its keys through backward, so recomputed (checkpointed) activations see the same masks.
    """
    layers = list(layers)
    if not layers or not any(getattr(layer.dropout, "p", 0.0) for layer in layers):
        return
    batch, length = shape
    rows = list(rows) + [-1] * (batch - len(rows))
    keys = dropout_keys(seed, step, rows, length, layers[0].lora_A.device)
    for salt, layer in enumerate(layers):
        layer.dropout_keys, layer.dropout_salt = keys, salt
