"""DoRA against the paper's dense form m · (W0 + ΔW) / ||W0 + ΔW||_row · x (+ bias), with the norm detached in backward
(Liu et al. 2024, §4.3), and two-way with peft's `use_dora` adapters."""

from __future__ import annotations

import pytest
import torch
from conftest import RANK, assert_same, logits, tiny_model
from lora_reference import D_IN, D_OUT, dense_weight
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit.adapter.convert import peft_tensors
from lorafit.adapter.load import load_adapter
from lorafit.adapter.save import save_adapter
from lorafit.lora.dora import DoRALinear
from lorafit.model.inject import inject_lora, lora_layers, merge_lora

SLICES = [[0, 1, 2, 3, 4, 5], [12, 13, 14, 15, 16, 17, 18, 19]]  # "q" and "v" of a fused 20-wide projection


def dora_layer(kind: str, slices=None) -> DoRALinear:
    """A DoRA layer on a small Linear or Conv1D with a bias, with non-zero B and magnitudes moved from their init."""
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT) if kind == "linear" else Conv1D(D_OUT, D_IN)
    if kind == "conv1d":
        nn.init.normal_(base.bias)
    base.requires_grad_(False)
    layer = DoRALinear(base, RANK, 8.0, slices=slices, fan_in_fan_out=kind == "conv1d")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=generator))
        layer.lora_magnitude.mul_(1 + 0.2 * torch.randn(layer.lora_magnitude.shape, generator=generator))
    return layer


def dense_dora(layer: DoRALinear, x: torch.Tensor, slices, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """m · (W0 + ΔW) / ||W0 + ΔW||_row · x + bias, from the layer's raw tensors; adapted rows only when sliced."""
    w0 = dense_weight(layer.base, layer.fan_in_fan_out)
    a, b, m = params["A"], params["B"], params["m"]
    rows = list(range(D_OUT)) if slices is None else [f for s in slices for f in s]
    delta = torch.zeros(D_OUT, D_IN)
    if slices is None:
        delta = layer.scaling * b @ a
    else:
        offset = 0
        for i, features in enumerate(slices):
            a_s, b_s = a[i * RANK : (i + 1) * RANK], b[offset : offset + len(features)]
            delta = delta.index_put((torch.tensor(features),), layer.scaling * b_s @ a_s)
            offset += len(features)
    w = w0 + delta
    norm = w.norm(dim=1).detach()  # §4.3: a constant in backward
    scale = torch.ones(D_OUT).index_put((torch.tensor(rows),), m / norm[rows])
    return x @ (scale[:, None] * w).t() + layer.base.bias.detach()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("sliced", [False, True])
def test_dora_output_and_gradients_equal_the_dense_form_with_the_norm_detached(kind, sliced):
    slices = SLICES if sliced else None
    layer = dora_layer(kind, slices)
    x = torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(2))
    ours = layer(x)
    ours.square().sum().backward()

    params = {name: p.detach().clone().requires_grad_() for name, p in
              (("A", layer.lora_A), ("B", layer.lora_B), ("m", layer.lora_magnitude))}
    dense = dense_dora(layer, x, slices, params)
    dense.square().sum().backward()
    assert_same(ours, dense)
    for name, parameter in (("A", layer.lora_A), ("B", layer.lora_B), ("m", layer.lora_magnitude)):
        torch.testing.assert_close(parameter.grad, params[name].grad, rtol=1e-4, atol=1e-5)
    assert layer.base.weight.grad is None


def test_dora_on_fused_rows_gives_magnitudes_to_adapted_rows_only_and_leaves_the_others_exactly_base():
    layer = dora_layer("conv1d", SLICES)
    assert layer.lora_magnitude.shape == (14,)
    x = torch.randn(4, D_IN)
    others = [f for f in range(D_OUT) if f not in {f for s in SLICES for f in s}]
    assert torch.equal(layer(x)[:, others], layer.base(x)[:, others])
    full = peft_tensors(layer)["magnitude"]
    assert torch.equal(full[others], dense_weight(layer.base, True)[others].norm(dim=1))


def test_dora_at_init_equals_the_base_exactly():
    model = tiny_model("llama")
    tokens = torch.randint(2, 100, (2, 9))
    before = logits(model, tokens)
    inject_lora(model, ["q", "v", "down"], RANK, 8.0, variant="dora")
    assert torch.equal(logits(model, tokens), before)


@pytest.mark.parametrize("sliced", [False, True])
def test_dora_merge_equals_unmerged_and_unmerge_restores_the_base(sliced):
    layer = dora_layer("conv1d", SLICES if sliced else None)
    base = layer.base.weight.detach().clone()
    x = torch.randn(4, D_IN)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert_same(layer(x), unmerged)
        assert_same(layer.base(x), unmerged)
        layer.unmerge()
    torch.testing.assert_close(layer.base.weight, base, rtol=1e-5, atol=1e-6)


def dora_model(arch: str, targets: list[str]):
    model = tiny_model(arch)
    layers = inject_lora(model, targets, RANK, 8.0, variant="dora")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator))
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=generator))
            layer.lora_magnitude.mul_(1 + 0.3 * torch.rand(layer.lora_magnitude.shape, generator=generator))
    return model


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_peft_loads_our_dora_adapter_with_the_same_logits(arch, tmp_path, tokens):
    import peft

    model = dora_model(arch, ["q", "v"])
    save_adapter(model, tmp_path, base_model="tiny", targets=["q", "v"])
    ours = logits(model, tokens)
    theirs = logits(peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval(), tokens)
    assert_same(theirs, ours)
    assert (ours - logits(tiny_model(arch), tokens)).abs().max() > 1e-2

    merged = tiny_model(arch)
    load_adapter(merged, tmp_path)
    assert_same(logits(merged, tokens), ours)
    merge_lora(merged)
    assert_same(logits(merged, tokens), ours)


PEFT_DORA_TARGETS = {"gpt2": ["c_attn", "mlp.c_proj"], "llama": ["q_proj", "v_proj", "down_proj"],
                     "gpt_neox": ["query_key_value"]}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_we_load_peft_dora_adapters_with_the_same_logits(arch, tmp_path, tokens):
    import peft

    config = peft.LoraConfig(r=RANK, lora_alpha=8, target_modules=PEFT_DORA_TARGETS[arch], use_dora=True,
                             fan_in_fan_out=arch == "gpt2", init_lora_weights=False)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_model(arch), config).eval()
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.3 * torch.rand(parameter.shape))
    theirs.save_pretrained(tmp_path)

    model = tiny_model(arch)
    layers = load_adapter(model, tmp_path)
    assert layers and all(isinstance(layer, DoRALinear) for layer in layers.values())
    assert_same(logits(model, tokens), logits(theirs, tokens))


def test_a_dora_adapter_round_trips_through_our_format_keeping_the_fused_slices(tmp_path, tokens):
    model = dora_model("gpt2", ["q", "v"])
    save_adapter(model, tmp_path, base_model="tiny", targets=["q", "v"])
    loaded = tiny_model("gpt2")
    layers = load_adapter(loaded, tmp_path)
    for path, layer in layers.items():
        assert layer.slices is not None
        assert torch.equal(layer.lora_magnitude, lora_layers(model)[path].lora_magnitude)
    assert_same(logits(loaded, tokens), logits(model, tokens))


def test_info_counts_dora_magnitudes_on_all_linear(tmp_path):
    import json

    from typer.testing import CliRunner

    from lorafit.cli import app

    tiny_model("gpt2").config.save_pretrained(tmp_path)
    result = CliRunner().invoke(app, ["info", "--model", str(tmp_path), "--rank", "2", "--targets", "all-linear",
                                      "--variant", "dora", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["lora"]["variant"] == "dora"
    # Every Conv1D of the blocks (weight [d_in, d_out]): A and B of rank 2 plus one magnitude per output row.
    expected = sum(2 * (d_in + d_out) + d_out for name, p in tiny_model("gpt2").named_parameters()
                   if name.startswith("transformer.h.") and name.endswith("weight") and p.ndim == 2
                   for d_in, d_out in [p.shape])
    assert report["trainable_params"] == expected
