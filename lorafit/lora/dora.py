"""DoRA (Liu et al. 2024, arXiv 2402.09353): LoRA's update split into a trained magnitude and a direction.

y = m ⊙ (W0 + ΔW)·x / ||W0 + ΔW||_row + bias, with m [d_out] initialised to the row norms of W0 (B = 0 at init,
so training starts at the base). The norm is a constant in backward (the paper's §4.3): it is recomputed
every forward from the current ΔW but gets no gradient, which saves the memory of its graph. No Hugging Face
knowledge here; the LoRA part is LoRALinear's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.lora.linear import LoRALinear, whole


class DoRALinear(LoRALinear):
    """A LoRALinear with a magnitude per adapted output row, `lora_magnitude` [n_adapted].

    On a fused projection with `slices` only the adapted rows (q and v) get a magnitude; the others (k) keep
    exactly W0, as their LoRA update is zero: their magnitude is in effect ||W0_row||.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, **options):
        super().__init__(base, rank, alpha, dropout, **options)
        rows = len(self.out_index) if self.out_index is not None else self.weight_shape[0]
        self.lora_magnitude = nn.Parameter(torch.empty(rows, device=base.weight.device, dtype=torch.float32))
        self._merged_norm: torch.Tensor | None = None  # the norm at merge time, to unmerge exactly
        self.reset_magnitude()

    @property
    def lora_params(self) -> int:
        return super().lora_params + self.lora_magnitude.numel()

    def reset_parameters(self, init: str | None = None) -> None:
        super().reset_parameters(init)
        if hasattr(self, "lora_magnitude"):
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m = ||W0 + ΔW||_row, so that the layer's output is unchanged by the magnitude."""
        if not self.lora_magnitude.is_meta:
            self.lora_magnitude.copy_(self.weight_norm())

    def _rows(self, matrix: torch.Tensor) -> torch.Tensor:
        """The adapted rows of a [d_out, ...] matrix."""
        return matrix if self.out_index is None else matrix.index_select(0, self._index(matrix.device))

    def base_weight(self) -> torch.Tensor:
        """W0 as [d_out, d_in] in fp32 (whole, where FSDP holds a shard outside the forward)."""
        weight = whole(self.base.weight).float()
        return weight.t() if self.fan_in_fan_out else weight

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W0 + ΔW|| of each adapted row, fp32 and detached (§4.3); never in autocast's lower precision."""
        with torch.autocast(self.lora_A.device.type, enabled=False):
            return torch.linalg.vector_norm(self._rows(self.base_weight() + self.delta_weight()), dim=1)

    def _full(self, per_row: torch.Tensor, fill: float) -> torch.Tensor:
        """A [d_out] vector: `per_row` at the adapted rows, `fill` elsewhere."""
        if self.out_index is None:
            return per_row
        d_out, _ = self.weight_shape
        return per_row.new_full((d_out,), fill).index_copy(0, self._index(per_row.device), per_row)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        # peft's form: base + (m/n - 1)·W0x + (m/n)·scaling·BAx, so rows with m/n = 1 and no update stay exactly base.
        scale = self._full(self.lora_magnitude / self.weight_norm(), 1.0)
        bias = self.bias
        base_only = out if bias is None else out - bias
        x = self._dropped(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        lora = F.linear(F.linear(x, self.lora_A), self.full_B()) * self.scaling
        return out + ((scale - 1) * base_only + scale * lora).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- (m/n) ⊙ (W0 + ΔW) row by row: the merged layer computes what the unmerged one did."""
        if self.merged:
            return
        norm = self.weight_norm()
        scale = self._full(self.lora_magnitude.float() / norm, 1.0)
        self._set_base((self.base_weight() + self.delta_weight()) * scale[:, None])
        self._merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        scale = self._full(self._merged_norm / self.lora_magnitude.float(), 1.0)
        self._set_base(self.base_weight() * scale[:, None] - self.delta_weight())
        self._merged_norm = None
        self.merged = False

    def _set_base(self, dense: torch.Tensor) -> None:
        weight = self.base.weight
        weight.copy_((dense.t() if self.fan_in_fan_out else dense).to(weight.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"
