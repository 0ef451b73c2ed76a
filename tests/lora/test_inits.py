"""PiSSA and OLoRA starts: the adapted model is the base at step 0, and the saved rank-2r adapter on the ORIGINAL
base reproduces the trained model, in lorafit and in peft."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same, logits, tiny_model

from lorafit.adapter.load import load_adapter
from lorafit.adapter.save import save_adapter
from lorafit.model.inject import inject_lora

peft = pytest.importorskip("peft")
CASES = [("gpt2", ["q", "v"]), ("llama", ["q", "v", "down"])]  # fused slices of a Conv1D; whole nn.Linear modules


def trained_like(layers) -> None:
    """Move A and B away from their start, as training would."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.add_(0.05 * torch.randn(layer.lora_A.shape, generator=generator))
            layer.lora_B.add_(0.05 * torch.randn(layer.lora_B.shape, generator=generator))


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("arch,targets", CASES)
def test_principal_start_is_the_base_model_at_step_0(arch, targets, init, tokens):
    model = tiny_model(arch)
    before = logits(model, tokens)
    layers = inject_lora(model, targets, 4, 8, init=init)
    assert all(layer.lora_B.abs().sum() > 0 for layer in layers.values())  # the adapter carries W0's principal part
    assert_same(logits(model, tokens), before)


def test_pissa_start_is_the_top_singular_part_of_each_slice():
    model = tiny_model("gpt2")
    w0 = model.transformer.h[0].attn.c_attn.weight.detach().t().clone()  # [d_out, d_in]
    layer = inject_lora(model, ["q", "v"], 4, 8, init="pissa")["transformer.h.0.attn.c_attn"]
    for i, features in enumerate(layer.slices):
        rows = w0[list(features)]
        u, s, vh = torch.linalg.svd(rows.double())
        best = (u[:, :4] * s[:4]) @ vh[:4]  # Eckart-Young: the best rank-4 approximation
        start = layer.scaling * layer.lora_B[i * 32:(i + 1) * 32] @ layer.lora_A[i * 4:(i + 1) * 4]
        torch.testing.assert_close(start.double(), best, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("arch,targets", CASES)
def test_converted_adapter_on_the_original_base_is_the_trained_model(arch, targets, init, tmp_path, tokens):
    model = tiny_model(arch)
    layers = inject_lora(model, targets, 4, 8, init=init)
    trained_like(layers)
    expected = logits(model, tokens)
    save_adapter(model, tmp_path, base_model="tiny", targets=targets)

    ours = tiny_model(arch)  # the original weights, not the residual
    loaded = load_adapter(ours, tmp_path)
    assert_same(logits(ours, tokens), expected)
    assert {layer.lora_A.shape[0] for layer in loaded.values()} == {2 * 4 * len(layer.slice_sizes) for layer in
                                                                    layers.values()}
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    assert_same(logits(theirs, tokens), expected)


def test_pissa_start_matches_peft_pissa():
    model = tiny_model("llama")
    ours = inject_lora(model, ["q_proj"], 4, 8, init="pissa")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa")
    theirs = peft.get_peft_model(tiny_model("llama"), config)
    for path, layer in ours.items():
        module = theirs.base_model.model.get_submodule(path)
        torch.testing.assert_close(layer.lora_A, module.lora_A["default"].weight)
        torch.testing.assert_close(layer.lora_B, module.lora_B["default"].weight)
        torch.testing.assert_close(layer.base.weight, module.base_layer.weight)
