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

INITS = ("kaiming", "gaussian")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha/r) · B·A·x, with A [r, d_in] random and B [d_out, r] zero, so training starts at base.

    `slices` adapts only some output rows of a fused projection (the q and v rows of GPT-2's c_attn):
    each slice gets its own rank-r pair (A_s, B_s) and the rows outside every slice (k) never change.
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
        self.fan_in_fan_out = fan_in_fan_out
        # rsLoRA (Kalajdzievski 2023) scales by alpha/sqrt(r) so larger ranks keep learning.
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.use_rslora = use_rslora
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

        d_out, d_in = self.weight_shape
        if slices is None:
            self.slice_sizes = [d_out]
            rows = None
        else:
            self.slice_sizes = [len(s) for s in slices]
            rows = torch.tensor([r for s in slices for r in s], dtype=torch.long)
            empty = min(self.slice_sizes, default=0) == 0
            if empty or rows.min() < 0 or rows.max() >= d_out or rows.unique().numel() != rows.numel():
                raise ValueError(f"slices must be disjoint, non-empty row sets inside [0, {d_out})")
        # Output rows that each slice writes, in slice order; None means the whole projection.
        self.register_buffer("rows", rows, persistent=False)

        factory = {"device": base.weight.device, "dtype": torch.float32}
        n_slices = len(self.slice_sizes)
        self.lora_A = nn.Parameter(torch.empty(n_slices * rank, d_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(sum(self.slice_sizes), rank, **factory))
        self.reset_parameters(init)

    @property
    def weight_shape(self) -> tuple[int, int]:
        """(d_out, d_in), whatever the storage layout of the base weight."""
        rows, cols = self.base.weight.shape
        return (cols, rows) if self.fan_in_fan_out else (rows, cols)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def reset_parameters(self, init: str = "kaiming") -> None:
        """A random, B zero: the update starts at exactly zero."""
        if self.lora_A.is_meta:
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

    def full_B(self) -> torch.Tensor:
        """B as one [d_out, n_slices·r] matrix: block-structured, zero in rows no slice adapts.

        This is also how PEFT sees a sliced layer: one LoRA of rank n_slices·r on the whole projection.
        """
        return self._scatter(self.lora_B)

    def _scatter(self, stacked: torch.Tensor) -> torch.Tensor:
        """Stacked [B_1; B_2; ...] -> the full-width block-structured B."""
        if self.rows is None:
            return stacked
        d_out, _ = self.weight_shape
        blocks = torch.block_diag(*stacked.split(self.slice_sizes))
        return blocks.new_zeros(d_out, blocks.shape[1]).index_copy(0, self.rows, blocks)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · B·A as a dense [d_out, d_in] matrix (for merging, never for the forward pass)."""
        return self.scaling * (self.full_B() @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        z = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)
        b = self.full_B()
        if z.dtype == out.dtype:
            # out + scaling·z·Bᵀ in one fused kernel, without a second [tokens, d_out] temporary.
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), z.reshape(-1, z.shape[-1]), b.t(), alpha=self.scaling)
            return flat.view(out.shape)
        return out + (F.linear(z, b) * self.scaling).to(out.dtype)

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
        weight = self.base.weight
        weight += (delta.t() if self.fan_in_fan_out else delta).to(weight.dtype)

    def peft_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the equivalent plain LoRA of rank n_slices·r on the whole projection."""
        return self.lora_A.detach(), self.full_B().detach()

    @torch.no_grad()
    def load_peft_weights(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Inverse of `peft_weights`; refuses a B with non-zero entries outside this layer's slice blocks."""
        if a.shape != self.lora_A.shape:
            raise ValueError(f"lora_A has shape {tuple(a.shape)}, expected {tuple(self.lora_A.shape)}")
        d_out, _ = self.weight_shape
        if b.shape != (d_out, self.lora_A.shape[0]):
            raise ValueError(f"lora_B has shape {tuple(b.shape)}, expected {(d_out, self.lora_A.shape[0])}")
        stacked = b
        if self.rows is not None:
            stacked = torch.cat([
                b[rows, i * self.rank : (i + 1) * self.rank]
                for i, rows in enumerate(self.rows.split(self.slice_sizes))
            ])
            # Check before copying, so a refused B leaves the layer as it was.
            if not torch.equal(self._scatter(stacked), b):
                raise ValueError("lora_B has non-zero entries outside the adapted rows")
        self.lora_A.copy_(a)
        self.lora_B.copy_(stacked)

    def extra_repr(self) -> str:
        parts = f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"
        if self.rows is not None:
            parts += f", slices={self.slice_sizes}"
        return parts + (", merged" if self.merged else "")
