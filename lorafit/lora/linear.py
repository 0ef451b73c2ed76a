"""The LoRA math (Hu et al. 2021, arXiv 2106.09685): a frozen projection plus a trainable low-rank update.

No Hugging Face knowledge lives here. A projection is any module with a 2-D `weight` (and an optional
`bias`) mapping d_in -> d_out; `fan_in_fan_out=True` says the weight is stored as [d_in, d_out], the way
GPT-2's Conv1D stores it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.lora.dropout import apply_keyed, keys_for
from lorafit.lora.fused import fused_applies, lora_projection
from lorafit.lora.inits import SVD_INITS, start_from_principal

INITS = ("kaiming", "gaussian", *SVD_INITS)


def projection_shape(module: nn.Module, fan_in_fan_out: bool = False) -> tuple[int, int]:
    """(d_out, d_in) of a projection, from `out_features`/`in_features` where it has them.

    Only a module without them is read from its weight: a packed 4-bit weight's shape is not the projection's.
    """
    d_out, d_in = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if isinstance(d_out, int) and isinstance(d_in, int):
        return d_out, d_in
    first, second = module.weight.shape
    return (second, first) if fan_in_fan_out else (first, second)


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """alpha/r; rsLoRA (Kalajdzievski 2023) scales by alpha/sqrt(r) instead, so larger ranks keep learning."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def is_block_structured(b: torch.Tensor, slices: Sequence[Sequence[int]], rank: int) -> bool:
    """True when B [d_out, n·r] is zero everywhere except slice i's output features in columns [i·r, (i+1)·r)."""
    inside = torch.zeros_like(b, dtype=torch.bool)
    for i, features in enumerate(slices):
        inside[torch.tensor(features, dtype=torch.long), i * rank : (i + 1) * rank] = True
    return not b[~inside].any()


class LoRALinear(nn.Module):
    """y = base(x) + (alpha/r) · B·A·x, with A [r, d_in] random and B [d_out, r] zero, so training starts at base.

    `slices` adapts only some output features of a fused projection (the q and v features of GPT-2's c_attn):
    each slice gets its own rank-r pair (A_s, B_s) and the features outside every slice (k) never change.
    The pairs are stored stacked — `lora_A` is [A_1; A_2; ...] and `lora_B` is [B_1; B_2; ...] — so the
    forward pass is one matmul down for all slices and one up, never materialising B·A.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        slices: Sequence[Sequence[int]] | None = None,
        fan_in_fan_out: bool = False,
        init: str = "kaiming",
        use_rslora: bool = False,
    ):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.init = init
        self.fan_in_fan_out = fan_in_fan_out
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.use_rslora = use_rslora
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

        d_out, d_in = self.weight_shape
        self.slices = None if slices is None else _checked_slices(slices, d_out)
        self.slice_sizes = [d_out] if self.slices is None else [len(s) for s in self.slices]
        # Output features that each slice writes, in slice order; None means the whole projection. Plain
        # Python data, so meta-device construction and to_empty() cannot lose it.
        self.out_index = None if self.slices is None else tuple(f for s in self.slices for f in s)
        self._index_on: dict[torch.device, torch.Tensor] = {}  # out_index per device; not a buffer
        # (start, stop) of each slice when they are increasing runs of features (q and v of a fused qkv): then the
        # forward builds B from them with no index tensor, which torch.compile would guard a device cache for.
        self.ranges = _increasing_ranges(self.slices)

        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(len(self.slice_sizes) * rank, d_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(sum(self.slice_sizes), rank, **factory))
        self.reset_parameters()

    @property
    def weight_shape(self) -> tuple[int, int]:
        """(d_out, d_in), whatever the storage layout of the base weight."""
        return projection_shape(self.base, self.fan_in_fan_out)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def reset_parameters(self, init: str | None = None) -> None:
        """A random, B zero: the update starts at exactly zero. Nothing to draw on the meta device."""
        if self.lora_A.is_meta:
            return
        init = init or self.init
        if init in SVD_INITS:
            start_from_principal(self, init)  # also moves W0's principal part out of the base weight
            return
        if init == "kaiming":
            # Same distribution as nn.Linear's default; the fan-in is d_in for every slice alike.
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / self.rank)
        nn.init.zeros_(self.lora_B)

    @property
    def lora_params(self) -> int:
        return self.lora_A.numel() + self.lora_B.numel()

    @property
    def max_rank(self) -> int:
        """The smaller side of the input and of every slice: a rank above it is no longer low-rank (and a slice's
        rows could not all be reached)."""
        return min(self.lora_A.shape[1], *self.slice_sizes)

    def full_B(self, stacked: torch.Tensor | None = None) -> torch.Tensor:
        """B (or `stacked`, a B laid out as lora_B) as one [d_out, n_slices·r] matrix: block-structured, zero in
        output features no slice adapts. This is the B of the equivalent plain LoRA of rank n_slices·r.
        """
        stacked = self.lora_B if stacked is None else stacked
        if self.out_index is None:
            return stacked
        d_out, _ = self.weight_shape
        blocks = torch.block_diag(*stacked.split(self.slice_sizes))
        if self.ranges is None:
            return blocks.new_zeros(d_out, blocks.shape[1]).index_copy(0, self._index(blocks.device), blocks)
        pieces, done, row = [], 0, 0
        for start, stop in self.ranges:  # zero rows before each slice's block, and after the last
            pieces += [blocks.new_zeros(start - done, blocks.shape[1]), blocks[row : row + stop - start]]
            done, row = stop, row + stop - start
        return torch.cat([*pieces, blocks.new_zeros(d_out - done, blocks.shape[1])])

    def _index(self, device: torch.device) -> torch.Tensor:
        """out_index as a tensor on `device`, copied there once rather than every forward."""
        index = self._index_on.get(device)
        if index is None:
            index = self._index_on[device] = torch.tensor(self.out_index, dtype=torch.long, device=device)
        return index

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · B·A as a dense [d_out, d_in] matrix (for merging, never for the forward pass)."""
        return self.scaling * (self.full_B() @ self.effective_A())

    def effective_A(self) -> torch.Tensor:
        """The A of the forward pass and of ΔW: lora_A itself here; AdaLoRA folds its Λ in."""
        return self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_applies(self, x):  # the same result, keeping less for backward (lorafit.lora.fused)
            return lora_projection(self, x)
        out = self.base(x)
        if self.merged:
            return out
        x = self._dropped(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)  # under autocast the matmul casts; an fp32 copy of x would be wasted
        z = F.linear(x, self.effective_A())
        b = self.full_B()
        if z.dtype == out.dtype:
            # out + scaling·z·Bᵀ in one fused kernel, without a second [tokens, d_out] temporary.
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), z.reshape(-1, z.shape[-1]), b.t(), alpha=self.scaling)
            return flat.view(out.shape)
        return out + (F.linear(z, b) * self.scaling).to(out.dtype)

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout on the LoRA branch's input: masks keyed by (row, position) inside `keyed_dropout`, else random."""
        p = getattr(self.dropout, "p", 0.0)
        keys = keys_for(self) if self.training and p > 0 else None
        if keys is None or keys.shape != x.shape[:-1]:
            return self.dropout(x)
        return apply_keyed(x, keys, p)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight, so inference costs nothing extra."""
        if self.merged:
            return
        self._add_to_base(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ΔW back out of the base weight (exact up to fp32 rounding)."""
        if not self.merged:
            return
        self._add_to_base(-self.delta_weight())
        self.merged = False

    def _add_to_base(self, delta: torch.Tensor) -> None:
        if getattr(self.base, "quantized", False):
            # Rounding W0 + ΔW to 4 bits would lose most of ΔW: merge into the full-precision base instead.
            raise ValueError("cannot merge LoRA into a quantized weight; merge into the full-precision base model")
        weight = self.base.weight
        weight += (delta.t() if self.fan_in_fan_out else delta).to(weight.dtype)

    def extra_repr(self) -> str:
        parts = f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"
        if self.slices is not None:
            parts += f", slices={self.slice_sizes}"
        return parts + (", merged" if self.merged else "")


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a sharded DTensor (a collective: every process calls it); others as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _increasing_ranges(slices) -> tuple[tuple[int, int], ...] | None:
    """Each slice as (start, stop) when every slice is a run of consecutive features after the one before, else None."""
    if slices is None or any(list(s) != list(range(s[0], s[-1] + 1)) for s in slices):
        return None
    ranges = tuple((s[0], s[-1] + 1) for s in slices)
    return ranges if all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:])) else None


def _checked_slices(slices: Sequence[Sequence[int]], d_out: int) -> tuple[tuple[int, ...], ...]:
    """Slices as tuples of ints, or ValueError unless they are disjoint, non-empty sets inside [0, d_out)."""
    checked = tuple(tuple(int(f) for f in s) for s in slices)
    features = [f for s in checked for f in s]
    inside = all(0 <= f < d_out for f in features)
    if not checked or not all(checked) or not inside or len(set(features)) != len(features):
        raise ValueError(f"slices must be disjoint, non-empty output-feature sets inside [0, {d_out})")
    return checked
