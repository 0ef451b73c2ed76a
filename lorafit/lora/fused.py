"""A LoRA projection as one autograd function that keeps only what its backward needs. No HF knowledge here.

y = base(x) + scaling · (drop(x)·Aᵀ)·Bᵀ, for a frozen dense base (nn.Linear, or GPT-2's Conv1D with its
weight stored [d_in, d_out]). Autograd, left to itself, keeps the dropped input drop(x) (a new [tokens, d_in]
tensor per LoRA layer) and its boolean mask; this function keeps x itself, which the layer's caller holds
anyway and which layers sharing an input (Llama's q, k and v) share, and recomputes the keyed mask from the
[tokens] keys in backward. The arithmetic is the plain path's (LoRALinear.forward), op for op, so where it
is used the result is the same; torch.compile, which fuses on its own, is given the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.lora.dropout import apply_keyed, keep_mask, keys_for, masked


def _dense_base(base: nn.Module) -> bool:
    """nn.Linear itself (not a 4-bit subclass) or a Conv1D, with a frozen weight."""
    dense = type(base) is nn.Linear or type(base).__name__ == "Conv1D"
    return dense and not base.weight.requires_grad


def fused_applies(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer`'s forward on `x` can run as LoRAProjection with the plain path's result: gradients wanted, a
    dense frozen base, dropout off or keyed, and the plain path's one-kernel update (the LoRA matmuls in the
    output's dtype: under autocast, or on a base in the LoRA weights' float32)."""
    if layer.merged or not torch.is_grad_enabled() or torch.compiler.is_compiling() or not _dense_base(layer.base):
        return False
    if layer.training and getattr(layer.dropout, "p", 0.0) and _keys(layer, x) is None:
        return False  # torch's own dropout, drawn from its RNG
    return torch.is_autocast_enabled(x.device.type) or layer.base.weight.dtype == layer.lora_A.dtype


def _keys(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    keys = keys_for(layer)
    return keys if keys is not None and keys.shape == x.shape[:-1] else None


def lora_projection(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for a layer that `fused_applies` to."""
    p = getattr(layer.dropout, "p", 0.0) if layer.training else 0.0
    keys = _keys(layer, x) if p else None
    a = layer.effective_A()
    # the dtype of the plain path's LoRA matmuls: autocast's, else the LoRA weights' (x is cast to it)
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else a.dtype
    return LoRAProjection.apply(x, layer.base, a, layer.full_B(), keys, p, layer.scaling, layer.fan_in_fan_out, dtype)


class LoRAProjection(torch.autograd.Function):
    """base(x) + scaling · (drop(x)·Aᵀ)·Bᵀ, saving x, the LoRA down-projection z [tokens, r] and the dropout keys."""

    @staticmethod
    def forward(ctx, x, base, a, b, keys, p, scaling, fan_in_fan_out, dtype):  # noqa: D102
        out = base(x)  # under the caller's autocast, as the plain path runs it
        x_lora = x.to(dtype)
        dropped = apply_keyed(x_lora, keys, p) if keys is not None else x_lora
        a_c, b_c = a.to(dtype), b.to(dtype)
        z = F.linear(dropped, a_c)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), z.reshape(-1, z.shape[-1]), b_c.t(), alpha=scaling)
        ctx.save_for_backward(x_lora, base.weight, a_c, b_c, z, keys)
        ctx.p, ctx.scaling, ctx.fan_in_fan_out = p, scaling, fan_in_fan_out
        ctx.dtypes = (x.dtype, a.dtype, b.dtype)
        return flat.view(out.shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x_lora, weight, a_c, b_c, z, keys = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        g = grad.reshape(-1, grad.shape[-1])
        g_lora = g.to(b_c.dtype)
        grad_z = (g_lora @ b_c) * ctx.scaling  # addmm's alpha scales both of its matmul's gradients
        drop = _dropout(keys, ctx.p, x_lora)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_b = ((g_lora.t() @ z.reshape(-1, z.shape[-1])) * ctx.scaling).to(b_dtype)
        if ctx.needs_input_grad[2]:
            dropped = drop(x_lora)  # recomputed, not kept
            grad_a = (grad_z.t() @ dropped.reshape(-1, dropped.shape[-1])).to(a_dtype)
        if ctx.needs_input_grad[0]:
            grad_dropped = drop((grad_z @ a_c).view(*grad.shape[:-1], -1))  # the dropout's backward: mask and scale
            grad_x = grad @ (weight.t() if ctx.fan_in_fan_out else weight) + grad_dropped.to(x_dtype)
        return grad_x, None, grad_a, grad_b, None, None, None, None, None


def _dropout(keys: torch.Tensor | None, p: float, like: torch.Tensor):
    """The keyed dropout of the forward, for tensors shaped like `like`: on a CPU with the mask hashed once for
    both of backward's uses, on a GPU as the fused kernel (which hashes as it goes)."""
    if keys is None:
        return lambda tensor: tensor
    if like.device.type == "cuda":
        return lambda tensor: apply_keyed(tensor, keys, p)
    keep = keep_mask(keys, like.shape[-1], p)
    return lambda tensor: masked(tensor, keep, p)
