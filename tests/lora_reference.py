"""The independent dense computation LoRALinear is checked against, and the small layers it is checked on.

Dense: y = x·(W0 + scaling·B·A)ᵀ + bias, with each fused slice's features moved by its own B_s·A_s.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit.lora.linear import LoRALinear

D_IN, D_OUT, RANK, ALPHA = 12, 20, 4, 8.0


def dense_weight(base: nn.Module, fan_in_fan_out: bool) -> torch.Tensor:
    """The base weight as [d_out, d_in], whatever the module stores."""
    weight = base.weight.detach().clone()
    return weight.t().contiguous() if fan_in_fan_out else weight


def dense_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x @ weight.t()
    return out if bias is None else out + bias


def randomize_b(layer: LoRALinear, seed: int = 1) -> None:
    """B starts at zero; give it values so the update is visible."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))


def slice_pairs(layer: LoRALinear, slices: list[list[int]]) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(features, A_s, B_s) per slice, read out of the stacked lora_A / lora_B as the class documents."""
    pairs, offset = [], 0
    for index, features in enumerate(slices):
        a = layer.lora_A[index * layer.rank : (index + 1) * layer.rank].detach()
        b = layer.lora_B[offset : offset + len(features)].detach()
        pairs.append((features, a, b))
        offset += len(features)
    return pairs


def dense_update(layer: LoRALinear, slices: list[list[int]] | None) -> torch.Tensor:
    """ΔW [d_out, d_in]: each slice's features moved by its own scaling·B_s·A_s, every other feature zero."""
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    if slices is None:
        return layer.scaling * b @ a
    update = torch.zeros(layer.weight_shape)
    for features, a_s, b_s in slice_pairs(layer, slices):
        update[torch.tensor(features)] = layer.scaling * (b_s @ a_s)
    return update


def sliced_dense_weight(layer: LoRALinear, slices: list[list[int]]) -> torch.Tensor:
    """W0 + ΔW, from the layer's current (unmerged) base weight."""
    return dense_weight(layer.base, layer.fan_in_fan_out) + dense_update(layer, slices)


def make_base(kind: str, d_in: int = D_IN, d_out: int = D_OUT) -> tuple[nn.Module, bool]:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(d_in, d_out), False
    base = Conv1D(d_out, d_in)  # weight stored [d_in, d_out]
    nn.init.normal_(base.weight, std=0.2)
    nn.init.normal_(base.bias, std=0.2)
    return base, True


def inputs(d_in: int = D_IN) -> torch.Tensor:
    return torch.randn(3, 5, d_in, generator=torch.Generator().manual_seed(2))


def per_head_features(part: int, heads: int, head_dim: int) -> list[int]:
    """Rows of part `part` in a projection laid out [head, (q, k, v), head_dim]."""
    return [(head * 3 + part) * head_dim + i for head in range(heads) for i in range(head_dim)]


FUSED_D = 8  # a [3d, d] projection with d = 8: two heads of size 4
FUSED_SLICES = {
    "contiguous q,v": [list(range(0, FUSED_D)), list(range(2 * FUSED_D, 3 * FUSED_D))],
    "per-head q,v": [per_head_features(0, 2, 4), per_head_features(2, 2, 4)],
    "per-head k only": [per_head_features(1, 2, 4)],
    "features out of order": [[5, 0, 3], [23, 9, 16, 12]],
}
