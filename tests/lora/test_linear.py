"""LoRALinear against an independent dense computation: y = x·(W0 + scaling·B·A)ᵀ + bias, forward and backward."""

from __future__ import annotations

import math

import pytest
import torch
from lora_reference import (
    ALPHA,
    D_IN,
    D_OUT,
    FUSED_D,
    FUSED_SLICES,
    RANK,
    dense_output,
    dense_weight,
    inputs,
    make_base,
    randomize_b,
    sliced_dense_weight,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lorafit.lora.linear import LoRALinear, projection_shape


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_output_matches_dense_w0_plus_scaled_ba(kind):
    base, fan_in_fan_out = make_base(kind)
    layer = LoRALinear(base, RANK, ALPHA, fan_in_fan_out=fan_in_fan_out)
    randomize_b(layer)
    x = inputs()
    delta = (ALPHA / RANK) * layer.lora_B.detach() @ layer.lora_A.detach()
    expected = dense_output(x, dense_weight(base, fan_in_fan_out) + delta, base.bias.detach())
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_conv1d_weight_shape_is_read_transposed():
    base, _ = make_base("conv1d")
    assert tuple(base.weight.shape) == (D_IN, D_OUT)
    layer = LoRALinear(base, RANK, ALPHA, fan_in_fan_out=True)
    assert layer.weight_shape == (D_OUT, D_IN)
    assert tuple(layer.lora_A.shape) == (RANK, D_IN)
    assert tuple(layer.lora_B.shape) == (D_OUT, RANK)


class PackedProjection(nn.Module):
    """Stands in for a 4-bit linear: d_out·d_in/2 bytes in a [n, 1] weight, the real shape in in/out_features."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.weight = nn.Parameter(torch.zeros(d_in * d_out // 2, 1, dtype=torch.uint8), requires_grad=False)


def test_projection_shape_comes_from_in_and_out_features_not_a_packed_weight():
    assert projection_shape(PackedProjection(D_IN, D_OUT)) == (D_OUT, D_IN)
    layer = LoRALinear(PackedProjection(D_IN, D_OUT), RANK, ALPHA)
    assert tuple(layer.lora_A.shape) == (RANK, D_IN)
    assert tuple(layer.lora_B.shape) == (D_OUT, RANK)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("slices", FUSED_SLICES.values(), ids=FUSED_SLICES.keys())
def test_fused_slices_move_only_their_own_features(kind, slices):
    base, fan_in_fan_out = make_base(kind, d_in=FUSED_D, d_out=3 * FUSED_D)
    layer = LoRALinear(base, RANK, ALPHA, slices=slices, fan_in_fan_out=fan_in_fan_out)
    randomize_b(layer)
    x = inputs(FUSED_D)

    out = layer(x)
    expected = dense_output(x, sliced_dense_weight(layer, slices), base.bias.detach())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    untouched = sorted(set(range(3 * FUSED_D)) - {feature for features in slices for feature in features})
    assert torch.equal(out[..., untouched], base(x)[..., untouched])
    adapted = sorted(feature for features in slices for feature in features)
    assert not torch.allclose(out[..., adapted], base(x)[..., adapted])


def test_fused_slices_have_one_rank_r_pair_each():
    slices = FUSED_SLICES["contiguous q,v"]
    layer = LoRALinear(nn.Linear(FUSED_D, 3 * FUSED_D), RANK, ALPHA, slices=slices)
    assert tuple(layer.lora_A.shape) == (2 * RANK, FUSED_D)
    assert tuple(layer.lora_B.shape) == (2 * FUSED_D, RANK)
    assert layer.lora_params == 2 * RANK * (FUSED_D + FUSED_D)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("slices", [None, FUSED_SLICES["per-head q,v"]], ids=["whole", "sliced"])
def test_output_equals_base_at_init(kind, slices):
    base, fan_in_fan_out = make_base(kind, d_in=FUSED_D, d_out=3 * FUSED_D)
    layer = LoRALinear(base, RANK, ALPHA, slices=slices, fan_in_fan_out=fan_in_fan_out)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) > 0
    x = inputs(FUSED_D)
    assert torch.equal(layer(x), base(x))


def test_kaiming_and_gaussian_inits_differ():
    d_in, rank = 1024, 8
    torch.manual_seed(0)
    kaiming = LoRALinear(nn.Linear(d_in, 16), rank, ALPHA, init="kaiming").lora_A.detach()
    gaussian = LoRALinear(nn.Linear(d_in, 16), rank, ALPHA, init="gaussian").lora_A.detach()

    # nn.Linear's default: uniform on ±1/sqrt(fan_in), so std = bound/sqrt(3).
    bound = 1 / math.sqrt(d_in)
    assert kaiming.abs().max() <= bound
    assert kaiming.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)

    assert gaussian.mean().item() == pytest.approx(0.0, abs=0.01)
    assert gaussian.std().item() == pytest.approx(1 / rank, rel=0.05)
    within_one_std = (gaussian.abs() <= 1 / rank).float().mean().item()
    assert within_one_std == pytest.approx(0.6827, abs=0.02)  # normal, not uniform (0.577)




def test_dropout_with_zero_b_leaves_output_unchanged_in_train_mode():
    base, _ = make_base("linear")
    layer = LoRALinear(base, RANK, ALPHA, dropout=0.5).train()
    x = inputs()
    assert torch.equal(layer(x), base(x))
    assert torch.equal(layer(x), base(x))


def test_dropout_is_random_in_train_mode_and_off_in_eval_mode():
    base, _ = make_base("linear")
    layer = LoRALinear(base, RANK, ALPHA, dropout=0.5)
    randomize_b(layer)
    x = inputs()
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    first, second = layer(x), layer(x)
    assert torch.equal(first, second)
    delta = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(first, dense_output(x, base.weight.detach() + delta, base.bias.detach()))


def test_dropout_applies_to_the_lora_input_only():
    base, _ = make_base("linear")
    layer = LoRALinear(base, RANK, ALPHA, dropout=0.5).train()
    randomize_b(layer)
    x = inputs()
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, p=0.5, training=True)
    torch.manual_seed(7)
    out = layer(x)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    expected = base(x) + layer.scaling * dropped @ a.t() @ b.t()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_gradients_reach_only_lora_and_match_dense(kind):
    base, fan_in_fan_out = make_base(kind, d_in=FUSED_D, d_out=3 * FUSED_D)
    base.requires_grad_(False)
    slices = FUSED_SLICES["contiguous q,v"]
    layer = LoRALinear(base, RANK, ALPHA, slices=slices, fan_in_fan_out=fan_in_fan_out)
    randomize_b(layer)
    x = inputs(FUSED_D)
    target = torch.randn(3, 5, 3 * FUSED_D, generator=torch.Generator().manual_seed(3))
    ((layer(x) - target) ** 2).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None

    # The same loss written densely, with per-slice leaves copied from the layer.
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    weight = dense_weight(base, fan_in_fan_out)
    q_features, v_features = (torch.tensor(features) for features in slices)
    update = torch.zeros_like(weight)
    update = update.index_add(0, q_features, b[:FUSED_D] @ a[:RANK]).index_add(0, v_features, b[FUSED_D:] @ a[RANK:])
    out = dense_output(x, weight + layer.scaling * update, base.bias)
    ((out - target) ** 2).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_forward_never_calls_delta_weight(monkeypatch):
    layer = LoRALinear(nn.Linear(FUSED_D, 3 * FUSED_D), RANK, ALPHA, slices=FUSED_SLICES["per-head q,v"])
    randomize_b(layer)

    def forbidden(self):
        raise AssertionError("delta_weight called during the forward pass")

    monkeypatch.setattr(LoRALinear, "delta_weight", forbidden)
    layer.train()
    layer(inputs(FUSED_D)).sum().backward()


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every new tensor an aten op returns (views of `ignore`, such as Wᵀ, are skipped)."""

    def __init__(self, ignore: torch.Tensor):
        super().__init__()
        self.ignored_storage = ignore.untyped_storage().data_ptr()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for item in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(item, torch.Tensor) and item.untyped_storage().data_ptr() != self.ignored_storage:
                self.shapes.add(tuple(item.shape))
        return result


def test_training_step_never_forms_a_dense_update():
    d_in, d_out = 48, 80  # distinct from every other size in play, so a [d_out, d_in] tensor means B·A
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    layer = LoRALinear(base, RANK, ALPHA, dropout=0.1, slices=[list(range(0, 16)), list(range(40, 72))]).train()
    randomize_b(layer)
    x = torch.randn(2, 5, d_in)
    with ShapeRecorder(ignore=base.weight) as recorder:
        layer(x).pow(2).mean().backward()
    assert (d_out, d_in) not in recorder.shapes
    assert (d_in, d_out) not in recorder.shapes
    assert (2 * RANK, d_in) in recorder.shapes  # the recorder does see the LoRA gradients



def test_rslora_scales_by_alpha_over_sqrt_rank():
    base, _ = make_base("linear")
    layer = LoRALinear(base, 16, ALPHA, use_rslora=True)
    assert layer.scaling == pytest.approx(ALPHA / 4)
    randomize_b(layer)
    x = inputs()
    delta = ALPHA / math.sqrt(16) * layer.lora_B.detach() @ layer.lora_A.detach()
    expected = dense_output(x, base.weight.detach() + delta, base.bias.detach())
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_plain_scaling_is_alpha_over_rank():
    assert LoRALinear(nn.Linear(D_IN, D_OUT), 16, ALPHA).scaling == pytest.approx(ALPHA / 16)


@pytest.mark.parametrize("rank", [0, -1])
def test_non_positive_rank_raises(rank):
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(D_IN, D_OUT), rank, ALPHA)


def test_unknown_init_raises():
    with pytest.raises(ValueError, match="init"):
        LoRALinear(nn.Linear(D_IN, D_OUT), RANK, ALPHA, init="xavier")


BAD_SLICES = {
    "overlapping": [[0, 1, 2], [2, 3]],
    "negative feature": [[-1, 0]],
    "feature past d_out": [[0, D_OUT]],
    "no features at all": [[]],
    "one empty slice": [[0, 1], []],
}


@pytest.mark.parametrize("slices", BAD_SLICES.values(), ids=BAD_SLICES.keys())
def test_invalid_slices_raise(slices):
    with pytest.raises(ValueError, match="slices"):
        LoRALinear(nn.Linear(D_IN, D_OUT), RANK, ALPHA, slices=slices)


def test_low_precision_base_keeps_its_dtype_and_starts_at_base():
    base = nn.Linear(D_IN, D_OUT).to(torch.bfloat16)
    layer = LoRALinear(base, RANK, ALPHA)
    assert layer.lora_A.dtype == torch.float32
    x = inputs().to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, base(x))



def test_layer_built_on_meta_then_to_empty_gives_the_same_output():
    """FSDP's path: build on the meta device, materialise with to_empty(), load the weights."""
    slices = FUSED_SLICES["per-head q,v"]
    reference = LoRALinear(nn.Linear(FUSED_D, 3 * FUSED_D), RANK, ALPHA, slices=slices)
    randomize_b(reference)
    with torch.device("meta"):
        layer = LoRALinear(nn.Linear(FUSED_D, 3 * FUSED_D), RANK, ALPHA, slices=slices)
    layer.to_empty(device="cpu")
    layer.load_state_dict(reference.state_dict())
    x = inputs(FUSED_D)
    assert torch.equal(layer(x), reference(x))
    assert not torch.equal(reference(x), reference.base(x))


def test_reset_parameters_after_to_empty_redraws_with_the_layers_init():
    with torch.device("meta"):
        layer = LoRALinear(nn.Linear(D_IN, D_OUT), RANK, ALPHA, init="gaussian")
    layer.to_empty(device="cpu")
    torch.manual_seed(4)
    layer.reset_parameters()
    torch.manual_seed(4)
    expected = torch.empty(RANK, D_IN).normal_(std=1.0 / RANK)
    assert torch.equal(layer.lora_A.detach(), expected)
    assert torch.count_nonzero(layer.lora_B) == 0


def test_state_dict_holds_the_base_and_lora_weights_only():
    layer = LoRALinear(nn.Linear(FUSED_D, 3 * FUSED_D), RANK, ALPHA, slices=FUSED_SLICES["per-head q,v"])
    assert set(layer.state_dict()) == {"base.weight", "base.bias", "lora_A", "lora_B"}
    assert not list(layer.buffers())
