"""LoRA on a weight parameter rather than a module: each expert of a stacked [experts, d_out, d_in] weight gets its
own rank-r pair, as peft's `target_parameters` does it. No Hugging Face knowledge lives here.

A mixture-of-experts layer keeps its experts' weights as 3-D parameters and indexes them inside its own forward
(a loop over experts, a batched or a grouped matmul, whichever its implementation is). The one update that is
exact for every such forward is to the weight itself: for the length of the wrapped module's forward, the
parameter reads W + scaling · B_e·A_e for every expert e, and the module runs unchanged. The update is dense
([experts, d_out, d_in] per forward, as in peft), which is why it has no dropout: x cannot be factored out of it.

A 2-D weight (a router's [experts, hidden]) is one "expert". `transposed` says the weight is stored
[experts, d_in, d_out] (gpt-oss) rather than [experts, d_out, d_in]. Several parameters of one module are
adapted by nesting: each layer wraps the module, or the layer around it, and swaps its own parameter only.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from lorafit.lora.linear import lora_scaling

INITS = ("kaiming", "gaussian")


class ExpertLoRA(nn.Module):
    """W_e + (alpha/r) · B_e·A_e for each expert e of `base`'s parameter `parameter`, with A [experts, r, d_in]
    random and B [experts, d_out, r] zero, so training starts at the base."""

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        *,
        parameter: str,
        transposed: bool = False,
        init: str = "kaiming",
        use_rslora: bool = False,
    ):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS} for LoRA on a parameter, got {init!r}")
        self.base = base
        self.parameter = parameter
        self.transposed = transposed
        self.rank = rank
        self.alpha = alpha
        self.init = init
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.dropout = nn.Identity()  # see the module docstring
        self.merged = False
        weight = self.weight
        if weight.ndim not in (2, 3):
            raise ValueError(f"{parameter} is {weight.ndim}-D; LoRA on a parameter needs a 2-D or 3-D weight")
        d_out, d_in = self.weight_shape
        factory = {"device": weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(self.experts, rank, d_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.experts, d_out, rank, **factory))
        self.reset_parameters()

    @property
    def owner(self) -> nn.Module:
        """The module that holds the parameter, inside any layers that adapt its other parameters."""
        module = self.base
        while isinstance(module, ExpertLoRA):
            module = module.base
        return module

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.parameter)

    @property
    def experts(self) -> int:
        weight = self.weight
        return weight.shape[0] if weight.ndim == 3 else 1

    @property
    def weight_shape(self) -> tuple[int, int]:
        """(d_out, d_in) of one expert's weight, whatever the storage layout."""
        first, second = self.weight.shape[-2:]
        return (second, first) if self.transposed else (first, second)

    @property
    def lora_params(self) -> int:
        return self.lora_A.numel() + self.lora_B.numel()

    @property
    def max_rank(self) -> int:
        return min(self.weight_shape)

    def reset_parameters(self, init: str | None = None) -> None:
        """A random, B zero. Kaiming's fan-in is d_in, as for each expert's own nn.Linear-shaped A."""
        if self.lora_A.is_meta:
            return
        flat = self.lora_A.view(-1, self.lora_A.shape[-1])  # [experts·r, d_in]: a view, so init fills lora_A
        if (init or self.init) == "kaiming":
            nn.init.kaiming_uniform_(flat, a=math.sqrt(5))
        else:
            nn.init.normal_(flat, std=1.0 / self.rank)
        nn.init.zeros_(self.lora_B)

    def adapted(self, weight: torch.Tensor) -> torch.Tensor:
        """weight + ΔW in the weight's own layout and dtype: one batched matmul over the experts."""
        a, b = self.lora_A.to(weight.dtype), self.lora_B.to(weight.dtype)
        # [E, d_out, r]·[E, r, d_in] = [E, d_out, d_in]; stored transposed: [E, d_in, r]·[E, r, d_out]
        left, right = (a.transpose(1, 2), b.transpose(1, 2)) if self.transposed else (b, a)
        stacked = weight if weight.ndim == 3 else weight.unsqueeze(0)
        # Autocast would round the sum to its dtype; the weight keeps its own (the module's matmuls cast later).
        with torch.autocast(weight.device.type, enabled=False):
            summed = torch.baddbmm(stacked, left, right, alpha=self.scaling)
        return summed if weight.ndim == 3 else summed.squeeze(0)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · B_e·A_e for every expert, in the weight's layout ([E, d_out, d_in], or its transpose)."""
        stacked = torch.zeros(self.experts, *self.weight.shape[-2:], device=self.lora_A.device)
        delta = self.adapted(stacked)
        return delta if self.weight.ndim == 3 else delta.squeeze(0)

    def forward(self, *args, **kwargs):
        if self.merged:
            return self.base(*args, **kwargs)
        inner = "base." * depth(self.base)  # the path from `base` to the owner, through other layers
        return functional_call(self.base, {inner + self.parameter: self.adapted(self.weight)}, args, kwargs,
                               tie_weights=False)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the parameter itself."""
        if not self.merged:
            self._add_to_weight(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add_to_weight(-self.delta_weight())
            self.merged = False

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        weight = self.weight
        weight += delta.to(weight.device, weight.dtype)

    def extra_repr(self) -> str:
        parts = f"{self.parameter}, experts={self.experts}, rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"
        return parts + (", merged" if self.merged else "")


def depth(module: nn.Module) -> int:
    """How many ExpertLoRA layers `module` is, or holds, around the module that owns their parameters."""
    count = 0
    while isinstance(module, ExpertLoRA):
        module, count = module.base, count + 1
    return count

