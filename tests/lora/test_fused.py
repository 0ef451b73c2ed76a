"""The fused LoRA projection computes the plain path's forward and gradients and keeps less for backward."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from lorafit.lora import fused
from lorafit.lora.dropout import dropout_keys, keep_mask, keyed_dropout, layer_keys
from lorafit.lora.linear import LoRALinear

P, ROWS, LENGTH, D_IN = 0.3, 3, 5, 16


def layer(kind: str, dropout: float) -> LoRALinear:
    torch.manual_seed(0)
    if kind == "conv1d":  # GPT-2's fused qkv, weight [d_in, d_out], LoRA on the q and v slices
        base = Conv1D(3 * 8, D_IN)
        lora = LoRALinear(base, rank=2, alpha=4, dropout=dropout, fan_in_fan_out=True,
                          slices=[range(0, 8), range(16, 24)])
    else:
        lora = LoRALinear(torch.nn.Linear(D_IN, 12), rank=2, alpha=4, dropout=dropout)
    lora.base.requires_grad_(False)
    torch.nn.init.normal_(lora.lora_B, std=0.5)
    return lora.train()


def dense(lora: LoRALinear, x, a, b, keep: torch.Tensor | None) -> torch.Tensor:
    """W0 x + b0 + scaling · B·A·drop(x) in float64 from the base weights as stored: an independent computation."""
    w0 = lora.base.weight.double()
    w0 = w0.t() if lora.fan_in_fan_out else w0
    dropped = x if keep is None else x * keep / (1 - P)
    return x @ w0.t() + lora.base.bias.double() + lora.scaling * dropped @ (lora.full_B(b) @ a).t()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dropout", [0.0, P])
def test_fused_projection_matches_dense_math_in_forward_and_gradients(kind, dropout):
    lora = layer(kind, dropout)
    x = torch.randn(ROWS, LENGTH, D_IN, requires_grad=True)
    upstream = torch.randn(ROWS, LENGTH, lora.weight_shape[0])
    keys = layer_keys(dropout_keys(1, 2, [4, 5, 6], LENGTH), 1)[0]
    with keyed_dropout([lora], seed=1, step=2, rows=[4, 5, 6], shape=(ROWS, LENGTH)):
        assert fused.fused_applies(lora, x)
        out = lora(x)
        out.backward(upstream)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, lora.lora_A, lora.lora_B))
    expected = dense(lora, x64, a64, b64, keep_mask(keys, D_IN, P) if dropout else None)
    expected.backward(upstream.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for found, reference in ((x.grad, x64.grad), (lora.lora_A.grad, a64.grad), (lora.lora_B.grad, b64.grad)):
        torch.testing.assert_close(found.double(), reference, rtol=1e-5, atol=1e-5)


def plain_and_fused(kind: str, x: torch.Tensor, upstream: torch.Tensor, monkeypatch) -> list[tuple]:
    """(output, grad x, grad A, grad B, bytes saved for backward) of the plain path, then of the fused one."""
    results = []
    for use_fused in (False, True):
        lora = layer(kind, P)
        monkeypatch.setattr(fused, "fused_applies", lambda *args, on=use_fused: on)
        monkeypatch.setattr("lorafit.lora.linear.fused_applies", lambda *args, on=use_fused: on)
        x_ = x.detach().clone().requires_grad_()
        saved = {}

        def pack(tensor, weights={id(p) for p in lora.parameters()}):
            if id(tensor) not in weights and id(tensor._base) not in weights and tensor is not x_:
                saved[id(tensor)] = tensor.numel() * tensor.element_size()
            return tensor

        with keyed_dropout([lora], seed=1, step=2, rows=[4, 5, 6], shape=(ROWS, LENGTH)), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = lora(x_)
        out.backward(upstream)
        results.append((out, x_.grad, lora.lora_A.grad, lora.lora_B.grad, sum(saved.values())))
    return results


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_projection_gives_the_plain_paths_result_and_keeps_no_copy_of_its_input(kind, monkeypatch):
    x = torch.randn(ROWS, LENGTH, D_IN)
    plain, fused_run = plain_and_fused(kind, x, torch.randn(ROWS, LENGTH, 24 if kind == "conv1d" else 12), monkeypatch)
    for mine, theirs in zip(fused_run[:4], plain[:4]):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)
    copy_of_x = ROWS * LENGTH * D_IN * 4  # the dropped input, float32
    assert fused_run[4] <= plain[4] - copy_of_x  # and the boolean mask: the keys recompute it


def test_fused_projection_runs_only_where_it_is_exact():
    lora = layer("linear", P)
    x = torch.randn(ROWS, LENGTH, D_IN)
    assert not fused.fused_applies(lora, x)  # training with torch's own (unkeyed) dropout
    with keyed_dropout([lora], seed=1, step=2, rows=[4, 5, 6], shape=(ROWS, LENGTH)):
        assert fused.fused_applies(lora, x)
        with torch.no_grad():
            assert not fused.fused_applies(lora, x)  # nothing to keep for backward
    lora.base.to(torch.bfloat16)
    assert not fused.fused_applies(lora.eval(), x.bfloat16())  # bf16 base without autocast: the plain path's own sum
