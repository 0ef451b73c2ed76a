"""LoRALinear.merge folds scaling·B·A into W0 with the same output, once however often it is called; unmerge
takes it out again."""

from __future__ import annotations

import pytest
import torch
from lora_reference import (
    ALPHA,
    FUSED_D,
    FUSED_SLICES,
    RANK,
    dense_update,
    dense_weight,
    inputs,
    make_base,
    randomize_b,
)

from lorafit.lora.linear import LoRALinear


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("slices", [None, FUSED_SLICES["per-head q,v"]], ids=["whole", "sliced"])
def test_merge_matches_unmerged_output_and_unmerge_restores_w0(kind, slices):
    base, fan_in_fan_out = make_base(kind, d_in=FUSED_D, d_out=3 * FUSED_D)
    layer = LoRALinear(base, RANK, ALPHA, slices=slices, fan_in_fan_out=fan_in_fan_out)
    randomize_b(layer)
    x = inputs(FUSED_D)
    w0 = base.weight.detach().clone()
    unmerged = layer(x)

    layer.merge()
    assert layer.merged
    expected = (w0.t() if fan_in_fan_out else w0) + dense_update(layer, slices)
    torch.testing.assert_close(dense_weight(base, fan_in_fan_out), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)

    layer.unmerge()
    assert not layer.merged
    assert torch.allclose(base.weight, w0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_twice_adds_the_update_once():
    base, _ = make_base("linear")
    layer = LoRALinear(base, RANK, ALPHA)
    randomize_b(layer)
    layer.merge()
    once = base.weight.detach().clone()
    layer.merge()
    assert torch.equal(base.weight, once)
    layer.unmerge()
    restored = base.weight.detach().clone()
    layer.unmerge()
    assert torch.equal(base.weight, restored)
