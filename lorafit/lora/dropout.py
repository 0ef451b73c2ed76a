"""LoRA dropout keyed by the row: a mask is a pure function of (seed, step, row, position, layer, feature).

So a row gets the same mask whichever process or micro-batch computes it, and a run's result does not depend
on the number of processes. No Hugging Face knowledge here.

Cost: a layer's keys [batch, length] are mixed on the host from the rows' data-set indices and reach the device
in one copy per micro-batch (never a host wait). The per-feature mask is an int32 hash (one multiply, one
xorshift, one multiply, wrapping mod 2^32 as torch's int32 arithmetic does on CPUs and GPUs alike) — fewer and
narrower passes than torch's own dropout takes on a CPU; on a CUDA device with Triton the hash and the dropout
are one compiled kernel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
from torch import nn

M32 = 0xFFFFFFFF  # the host-side key mixing works on 32-bit values held in int64: a product never overflows
FEATURE_MIX = 0x2C1B3C6D  # odd multipliers of the per-element hash
ROUND_MIX = 0x297A2D39


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply, two rounds) of int64 values in [0, 2^32), elementwise."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    return (x >> 16) ^ x


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """Values in [0, 2^32) as the int32 with the same 32 bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def dropout_keys(seed: int, step: int, rows: Sequence[int], length: int) -> torch.Tensor:
    """[len(rows), length] int64 keys on the CPU, one per (seed, step, row, position): what masks are drawn from.

    `rows` are the rows' indices in the data set, so a row gets the same masks whichever process or
    micro-batch computes it, and the result does not depend on the process count.
    """
    key = _mix32(torch.tensor([seed & M32]))
    key = _mix32(key ^ (step & M32))
    key = _mix32(key ^ (torch.tensor(list(rows), dtype=torch.long) & M32))
    return _mix32(key[:, None] ^ torch.arange(length))


def layer_keys(keys: torch.Tensor, layers: int) -> torch.Tensor:
    """[layers, *keys.shape] int32: the position keys mixed with each layer's place, so no two layers share masks."""
    salts = torch.arange(layers, dtype=torch.long).view(-1, *[1] * keys.dim())
    return _as_int32(_mix32(keys[None] ^ salts))


def _xorshift_multiply(h: torch.Tensor, multiplier: int) -> torch.Tensor:
    """h ^= h >>> 16, then h *= multiplier, in place on int32 (>> copies the sign bit, so the shift is masked)."""
    h ^= (h >> 16) & 0xFFFF
    h *= multiplier
    return h


def _feature_multipliers(features: int, device: torch.device) -> torch.Tensor:
    """[features] odd int32 multipliers, a hash of each input feature's index; made on the device, not copied there."""
    h = torch.arange(features, device=device, dtype=torch.int32) + 0x7F4A7C15
    h = _xorshift_multiply(_xorshift_multiply(h * FEATURE_MIX, FEATURE_MIX), FEATURE_MIX)
    return h | 1


def keep_mask(keys: torch.Tensor, features: int, p: float) -> torch.Tensor:
    """[*keys.shape, features] booleans, True with probability 1 - p: a pure function of (layer key, feature).

    `keys` are one layer's int32 keys. Each element is key × (the feature's odd multiplier), then one
    xorshift-multiply round, all mod 2^32; the top bits decide, so a mask element is dropped when the hash,
    read as a signed int32, is below -2^31 + p·2^32.
    """
    h = _xorshift_multiply(keys[..., None] * _feature_multipliers(features, keys.device), ROUND_MIX)
    return h >= round(p * 2**32) - 2**31


def masked(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of `x` with the mask `keep`: kept values scaled by 1/(1-p), the others 0."""
    # where() saves only the boolean mask for backward, as nn.Dropout does.
    return torch.where(keep, x * (1.0 / (1.0 - p)), x.new_zeros(()))


def dropped(x: torch.Tensor, keys: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of `x` [..., features] with the keyed mask of `keys` [...]."""
    return masked(x, keep_mask(keys, x.shape[-1], p), p)


_fused = None  # `dropped` compiled into one kernel, for CUDA devices with Triton; built on first use


def apply_keyed(x: torch.Tensor, keys: torch.Tensor, p: float) -> torch.Tensor:
    """`dropped(x, keys, p)`: on a CUDA device with Triton one fused kernel, elsewhere torch's own ops.

    Both compute the same int32 hash, so they give the same masks; the fused one reads x once and writes the
    output once (its backward recomputes the mask from the keys instead of keeping it).
    """
    global _fused
    if x.device.type != "cuda" or torch.compiler.is_compiling():
        return dropped(x, keys, p)
    if _fused is None:
        from torch.utils._triton import has_triton

        _fused = torch.compile(dropped, dynamic=True) if has_triton() else dropped
    try:
        return _fused(x, keys, p)
    except Exception:  # noqa: BLE001 - a compiler that fails here: the same masks from torch's own ops
        if _fused is dropped:
            raise
        _fused = dropped
        return dropped(x, keys, p)


_keyed: dict[nn.Module, torch.Tensor] = {}  # layer -> its keys [batch, length], while a keyed_dropout block is open


@contextmanager
def keyed_dropout(layers: Iterable[nn.Module], seed: int, step: int, rows: Sequence[int], shape: Sequence[int]):
    """Inside the block, the LoRA dropout of `layers` on a [batch, length] batch of `rows` is keyed by
    (seed, step, row, position, the layer's place in `layers`).

    Every layer gets its own key tensor (never a Python number, which torch.compile would specialise on), all
    made on the host and copied to the layers' device at once, without waiting. Hold the block over the
    backward too: gradient checkpointing recomputes the forward there, with the same masks. Rows past
    len(rows) (the one row of an empty micro-batch) get keys too; their masks touch no loss.
    """
    layers = list(layers)
    if not any(getattr(layer.dropout, "p", 0.0) for layer in layers):
        yield
        return
    batch, length = shape
    rows = list(rows) + [-1] * (batch - len(rows))
    keys = layer_keys(dropout_keys(seed, step, rows, length), len(layers))
    device = layers[0].lora_A.device
    if device.type == "cuda":
        keys = keys.pin_memory()
    keys = keys.to(device, non_blocking=True)
    # separate tensors, not views of one: torch.compile would guard on the shared base's shape
    _keyed.update((layer, layer_key.clone()) for layer, layer_key in zip(layers, keys.unbind(0)))
    try:
        yield
    finally:
        for layer in layers:
            _keyed.pop(layer, None)


def keys_for(layer: nn.Module) -> torch.Tensor | None:
    """`layer`'s keys inside a keyed_dropout block that names it, else None (then its dropout is torch's own)."""
    return _keyed.get(layer)


@contextmanager
def keys_selected(layer: nn.Module, positions: torch.Tensor):
    """Inside, `layer`'s keys are its keys at `positions` (flat indices into its [batch, length] keys) as one row
    [1, len(positions)]: for a layer run on some positions only (the output head on the supervised ones), so they
    get the masks the whole batch would have given them. Nothing happens outside a keyed_dropout block."""
    keys = _keyed.get(layer)
    if keys is None:
        yield
        return
    _keyed[layer] = keys.reshape(-1).index_select(0, positions)[None]
    try:
        yield
    finally:
        _keyed[layer] = keys
