"""LoRA dropout keyed by the row: a mask is a pure function of (seed, step, row, position, layer, feature).

So a row gets the same mask whichever process or micro-batch computes it, and a run's result does not depend
on the number of processes. Hashes work on 32-bit values held in int64. No Hugging Face knowledge here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
from torch import nn

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


def layer_keys(keys: torch.Tensor, salt: int) -> torch.Tensor:
    """One layer's keys: the position keys mixed with the layer's salt, so that no two layers share masks."""
    return _mix32(keys ^ (salt & M32))


def keep_mask(keys: torch.Tensor, features: int, p: float) -> torch.Tensor:
    """[*keys.shape, features] booleans, True with probability 1 - p, a pure function of (layer key, feature).

    The layer's key times an odd per-feature multiplier, then one xorshift-multiply round: as fast as
    torch's own dropout on a CPU, with no correlation between features above sampling noise.
    """
    multiplier = (_mix32(torch.arange(features, device=keys.device) + 0x9E3779B1 & M32) >> 1) | 1
    h = (keys[..., None] * multiplier) & M32
    h = ((h >> 15) ^ h) * 0x2C1B3C6D & M32
    return h >= int(p * 2**32)


_keyed: dict[nn.Module, torch.Tensor] = {}  # layer -> its keys [batch, length], while a keyed_dropout block is open


@contextmanager
def keyed_dropout(layers: Iterable[nn.Module], seed: int, step: int, rows: Sequence[int], shape: Sequence[int]):
    """Inside the block, the LoRA dropout of `layers` on a [batch, length] batch of `rows` is keyed by
    (seed, step, row, position, the layer's place in `layers`).

    Hold it over the backward too: gradient checkpointing recomputes the forward there, with the same masks.
    Rows past len(rows) (the one row of an empty micro-batch) get keys too; their masks touch no loss.
    """
    layers = list(layers)
    if not any(getattr(layer.dropout, "p", 0.0) for layer in layers):
        yield
        return
    batch, length = shape
    rows = list(rows) + [-1] * (batch - len(rows))
    keys = dropout_keys(seed, step, rows, length, layers[0].lora_A.device)
    _keyed.update((layer, layer_keys(keys, salt)) for salt, layer in enumerate(layers))
    try:
        yield
    finally:
        for layer in layers:
            _keyed.pop(layer, None)


def keys_for(layer: nn.Module) -> torch.Tensor | None:
    """`layer`'s keys inside a keyed_dropout block that names it, else None (then its dropout is torch's own)."""
    return _keyed.get(layer)
