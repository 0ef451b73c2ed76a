"""Starts that move W0's principal part into the adapter: PiSSA (Meng et al. 2024, arXiv 2404.02948) and OLoRA
(Büyükakyüz 2024, arXiv 2406.01775).

PiSSA: W0 = U·S·Vᵀ; B = U_r·sqrt(S_r/s), A = sqrt(S_r/s)·V_rᵀ, so that s·B·A is W0's best rank-r part, and the
base keeps the residual W0 − s·B·A (s = the LoRA scaling). OLoRA takes W0 = Q·R: B = Q_r, A = R_r, base W0 − s·B·A.
Either way the adapted model equals the base at step 0. A slice of a fused projection decomposes its own rows.

Such an adapter only works on the residual base. To save it against the original W0, as peft's
`path_initial_model_for_weight_conversion` does, ΔW = s·(B·A − B0·A0) = s·[B | −B0]·[A; A0]: a plain LoRA of
rank 2r with the same scaling (so alpha doubles with r), which any LoRA consumer loads onto the original base.
"""
from __future__ import annotations

import torch

SVD_INITS = ("pissa", "olora")


@torch.no_grad()
def principal_pair(weight: torch.Tensor, rank: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, d_in], B [d_out, r]) in fp32 with scaling·B·A the principal rank-r part of `weight` [d_out, d_in]."""
    weight = weight.float()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = (s[:rank] / scaling).sqrt()
        return root[:, None] * vh[:rank], u[:, :rank] * root
    if init == "olora":
        q, r = torch.linalg.qr(weight)
        return r[:rank], q[:, :rank]  # as peft and the paper: scaling·Q_r·R_r leaves the base
    raise ValueError(f"init must be one of {SVD_INITS}, got {init!r}")


@torch.no_grad()
def start_from_principal(layer, init: str) -> None:
    """Set A, B of a LoRALinear to each slice's principal part, keep them as A0, B0, and leave the residual in base."""
    weight = layer.base.weight
    dense = (weight.t() if layer.fan_in_fan_out else weight).float()  # [d_out, d_in]
    rows = [torch.arange(dense.shape[0])] if layer.slices is None else [torch.tensor(s) for s in layer.slices]
    pairs = [principal_pair(dense[index], layer.rank, layer.scaling, init) for index in rows]
    layer.lora_A.copy_(torch.cat([a for a, _ in pairs]))
    layer.lora_B.copy_(torch.cat([b for _, b in pairs]))
    layer.register_buffer("lora_A0", layer.lora_A.detach().clone(), persistent=False)
    layer.register_buffer("lora_B0", layer.lora_B.detach().clone(), persistent=False)
    residual = dense - layer.delta_weight()
    weight.copy_((residual.t() if layer.fan_in_fan_out else residual).to(weight.dtype))


def against_original(layer, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked (A, B) of a principal-start layer as the rank-2r LoRA of ΔW against the original base, slice by slice:
    A_s' = [A_s; A0_s] and B_s' = [B_s | −B0_s], so each slice keeps its own block (stacked as LoRALinear does).
    """
    r, sizes = layer.rank, layer.slice_sizes
    a0, b0 = layer.lora_A0.to(a), layer.lora_B0.to(b)
    a_parts = [torch.cat([a[i * r:(i + 1) * r], a0[i * r:(i + 1) * r]]) for i in range(len(sizes))]
    b_parts = [torch.cat([bs, -b0s], dim=1) for bs, b0s in zip(b.split(sizes), b0.split(sizes))]
    return torch.cat(a_parts), torch.cat(b_parts)
