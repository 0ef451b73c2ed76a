"""LoRALinear in PEFT's plain form (lorafit.adapter.convert): fused slices as one LoRA of stacked rank, and back
only when it fits."""

from __future__ import annotations

import pytest
import torch
from lora_reference import ALPHA, D_IN, D_OUT, FUSED_D, FUSED_SLICES, RANK, dense_update, inputs, randomize_b
from torch import nn

from lorafit.adapter.convert import load_peft_tensors, peft_tensors
from lorafit.lora.linear import LoRALinear


def plain_lora_weights(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = peft_tensors(layer)
    return tensors["A"], tensors["B"]


def load_plain_lora_weights(layer: LoRALinear, a: torch.Tensor, b: torch.Tensor) -> None:
    load_peft_tensors(layer, {"A": a, "B": b})


def test_plain_lora_weights_round_trip():
    slices = FUSED_SLICES["per-head q,v"]
    source = LoRALinear(nn.Linear(FUSED_D, 3 * FUSED_D), RANK, ALPHA, slices=slices)
    randomize_b(source)
    a, b = plain_lora_weights(source)
    target = LoRALinear(source.base, RANK, ALPHA, slices=slices)
    load_plain_lora_weights(target, a, b)
    assert torch.equal(target.lora_A, source.lora_A)
    assert torch.equal(target.lora_B, source.lora_B)
    x = inputs(FUSED_D)
    assert torch.equal(target(x), source(x))


def test_plain_lora_weights_are_one_lora_of_stacked_rank():
    slices = FUSED_SLICES["per-head q,v"]
    layer = LoRALinear(nn.Linear(FUSED_D, 3 * FUSED_D), RANK, ALPHA, slices=slices)
    randomize_b(layer)
    a, b = plain_lora_weights(layer)
    assert tuple(a.shape) == (2 * RANK, FUSED_D)
    assert tuple(b.shape) == (3 * FUSED_D, 2 * RANK)
    k_features = FUSED_SLICES["per-head k only"][0]
    assert torch.count_nonzero(b[k_features]) == 0
    # PEFT would hold rank 2r with lora_alpha 2·alpha: the same scaling alpha/r.
    plain = (2 * ALPHA) / (2 * RANK) * b @ a
    torch.testing.assert_close(plain, dense_update(layer, slices), rtol=1e-6, atol=1e-6)


def test_load_plain_lora_weights_refuses_non_zero_k_features():
    slices = FUSED_SLICES["contiguous q,v"]
    layer = LoRALinear(nn.Linear(FUSED_D, 3 * FUSED_D), RANK, ALPHA, slices=slices)
    randomize_b(layer)
    a, b = plain_lora_weights(layer)
    b = b.clone()
    b[FUSED_D + 1, 0] = 0.5  # a k feature
    fresh = LoRALinear(nn.Linear(FUSED_D, 3 * FUSED_D), RANK, ALPHA, slices=slices)
    with pytest.raises(ValueError, match="outside"):
        load_plain_lora_weights(fresh, a, b)


def test_load_plain_lora_weights_refuses_cross_slice_entries():
    slices = FUSED_SLICES["contiguous q,v"]
    layer = LoRALinear(nn.Linear(FUSED_D, 3 * FUSED_D), RANK, ALPHA, slices=slices)
    a, b = plain_lora_weights(layer)
    b = b.clone()
    b[0, RANK] = 1.0  # a q feature reading v's half of A
    with pytest.raises(ValueError, match="outside"):
        load_plain_lora_weights(layer, a, b)


def test_load_plain_lora_weights_refuses_wrong_shapes():
    layer = LoRALinear(nn.Linear(D_IN, D_OUT), RANK, ALPHA)
    a, b = plain_lora_weights(layer)
    with pytest.raises(ValueError, match="lora_A"):
        load_plain_lora_weights(layer, a[:-1], b)
    with pytest.raises(ValueError, match="lora_B"):
        load_plain_lora_weights(layer, a, b[:-1])


def test_refused_load_leaves_the_layer_unchanged():
    slices = FUSED_SLICES["contiguous q,v"]
    layer = LoRALinear(nn.Linear(FUSED_D, 3 * FUSED_D), RANK, ALPHA, slices=slices)
    randomize_b(layer)
    before = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
    a, b = (t.clone() for t in plain_lora_weights(layer))
    a += 1.0
    b[FUSED_D, 0] = 0.5  # a k feature
    with pytest.raises(ValueError):
        load_plain_lora_weights(layer, a, b)
    assert torch.equal(layer.lora_A, before[0])
    assert torch.equal(layer.lora_B, before[1])
