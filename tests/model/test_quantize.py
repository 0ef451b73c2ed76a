"""QLoRA: NF4 projections compute with their dequantized weight, a 4-bit base trains, and its adapter is plain LoRA."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same, logits, supervised_rows, tiny_model
from safetensors.torch import load_file
from torch.optim.lr_scheduler import LambdaLR

from lorafit.data.batches import collate
from lorafit.errors import LorafitError
from lorafit.model.inject import lora_layers, stores_transposed
from lorafit.model.load import decoder_blocks
from lorafit.model.quantize import NF4Linear, frozen_weight_bytes, nf4_bytes, quantize_blocks, require_torchao
from lorafit.recipe import LoraSection

pytest.importorskip("torchao")
NF4_CODES = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                          0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])  # QLoRA paper, appendix E


def quantized_tiny_gpt2() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the tiny GPT-2 with its blocks in NF4, the same model in full precision)."""
    model = tiny_model("gpt2").requires_grad_(False)
    original = copy.deepcopy(model)
    assert quantize_blocks(model, decoder_blocks(model), stores_transposed) == 0
    return model, original


def test_nf4_layer_forward_is_the_forward_of_its_dequantized_weight():
    weight, bias, x = torch.randn(96, 64), torch.randn(96), torch.randn(3, 5, 64)
    layer = NF4Linear(weight, bias)
    dense = layer.dequantized()
    torch.testing.assert_close(layer(x), F.linear(x, dense, bias), rtol=0, atol=0)
    # Each dequantized block of 64 is its absmax scale times a 4-bit NormalFloat code.
    blocks = dense.reshape(-1, 64)
    codes = blocks / blocks.abs().amax(dim=1, keepdim=True)
    assert (codes[..., None] - NF4_CODES).abs().amin(-1).max() < 1e-3
    assert (dense - weight).abs().max() < 0.2 * weight.abs().max()


def test_quantized_model_matches_a_dense_model_with_the_dequantized_weights(tokens):
    model, original = quantized_tiny_gpt2()
    quantized = {path: m for path, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert len(quantized) == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks
    dense = copy.deepcopy(original)
    with torch.no_grad():
        for path, layer in quantized.items():  # GPT-2's Conv1D stores [d_in, d_out]
            dense.get_submodule(path).weight.copy_(layer.dequantized().t())
    assert_same(logits(model, tokens), logits(dense, tokens))
    assert not torch.allclose(logits(model, tokens), logits(original, tokens))  # 4 bits do change the model


def test_frozen_bytes_count_nf4_at_torchao_storage_and_info_predicts_them():
    model, original = quantized_tiny_gpt2()
    stored = 0
    for layer in (m for m in model.modules() if isinstance(m, NF4Linear)):
        names, _ = layer.weight.__tensor_flatten__()
        parts = [getattr(layer.weight, name) for name in names]
        stored += sum(t.numel() * t.element_size() for t in parts)
        assert nf4_bytes(layer.weight.numel(), 4) == sum(t.numel() * t.element_size() for t in parts)
    rest = sum(p.numel() * 4 for n, p in original.named_parameters() if not n.startswith("transformer.h."))
    biases = sum(p.numel() * 4 for n, p in original.named_parameters() if n.startswith("transformer.h.") and
                 not (n.endswith(".weight") and ("c_attn" in n or "c_proj" in n or "c_fc" in n)))
    assert frozen_weight_bytes(model) == stored + rest + biases
    assert frozen_weight_bytes(original, planned=decoder_blocks(original)) == frozen_weight_bytes(model)


def train_steps(model: torch.nn.Module, steps: int) -> list[float]:
    from accelerate import Accelerator

    from lorafit.model.loss import SupervisedLoss
    from lorafit.train.step import train_step

    batch = collate(supervised_rows(), pad_id=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    accelerator = Accelerator(cpu=True)
    scorer, optimizer = accelerator.prepare(SupervisedLoss(model), optimizer)
    scheduler = LambdaLR(optimizer, lambda step: 1.0)
    scorer.train()
    return [train_step(accelerator, scorer, optimizer, scheduler, [batch], max_grad_norm=1.0)[0].item()
            for _ in range(steps)]


def nf4_trained(steps: int = 10) -> tuple[torch.nn.Module, list[float]]:
    from lorafit.train.step import prepare_model

    model = tiny_model("gpt2")
    lora = LoraSection(rank=4, alpha=8, dropout=0.0, targets=["q", "v", "o", "up", "down"])
    prepare_model(model, lora, gradient_checkpointing=True, quantize="nf4")
    return model, train_steps(model, steps)


def test_tiny_model_trains_on_an_nf4_base_with_checkpointing_and_loss_falls():
    model, losses = nf4_trained()
    assert losses[-1] < losses[0] - 0.15, losses  # from ln(128) = 4.85 on a random model
    bases = [layer.base for layer in lora_layers(model).values()]
    assert all(isinstance(base, NF4Linear) for base in bases)
    assert all(layer.lora_A.dtype == torch.float32 and layer.lora_B.abs().sum() > 0 for layer in lora_layers(model).values())
    assert not any(p.requires_grad for p in model.parameters() if type(p).__name__ == "NF4Tensor")
    with pytest.raises(ValueError, match="full-precision base"):
        next(iter(lora_layers(model).values())).merge()


def test_nf4_adapter_merges_into_the_full_precision_base_and_peft_agrees(tmp_path, tokens):
    import peft
    import transformers

    from lorafit.adapter.merge import merge_adapter
    from lorafit.adapter.save import save_adapter

    tiny_model("gpt2").save_pretrained(tmp_path / "base")  # the same seed as nf4_trained's base
    model, _ = nf4_trained(steps=3)
    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"), targets=["q", "v", "o", "up", "down"])
    merge_adapter(str(tmp_path / "base"), tmp_path / "adapter", tmp_path / "merged", force=False)

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    for i in range(2):  # dense math: W0 + (alpha/R)·B·A, with peft's alpha and R of the saved adapter
        key = f"base_model.model.transformer.h.{i}.attn.c_attn"
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        w0 = base.transformer.h[i].attn.c_attn.weight
        torch.testing.assert_close(merged.transformer.h[i].attn.c_attn.weight, w0 + (8 / 4 * b @ a).t())
    with_peft = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert_same(logits(with_peft, tokens), logits(merged, tokens))


def test_quantize_without_torchao_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(LorafitError, match=r"pip install 'lorafit\[qlora\]'") as error:
        require_torchao()
    assert error.value.exit_code == 2


def test_cli_trains_on_nf4_and_report_counts_the_4_bit_weights(tiny_recipe, tmp_path):
    import json

    from typer.testing import CliRunner

    from lorafit.cli import app

    recipe = tiny_recipe(model={"quantize": "nf4"}, train={"max_steps": 2, "batch_size": 2, "log_every": 1})
    result = CliRunner().invoke(app, ["train", "--recipe", str(recipe), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    # tiny-gpt2: 4 blocks of c_attn 128x384, c_proj 128x128, c_fc 128x512, mlp.c_proj 512x128.
    weights = 4 * (128 * 384 + 128 * 128 + 2 * 128 * 512)
    assert report["quantize"]["modules"] == 16 and report["quantize"]["params"] == weights
    full = report["memory"]["full_finetune_estimate"]["weights"]  # fp32 everywhere
    assert full - report["memory"]["lora_estimate"]["weights"] == weights * 4 - report["quantize"]["bytes"] - (
        report["trainable_params"] * 4)
    assert report["quantize"]["bytes"] < weights * 0.6


def test_nf4_with_fsdp_is_refused_in_one_line(tiny_recipe):
    from lorafit.recipe_file import load_recipe

    with pytest.raises(LorafitError, match="quantize with \\[train\\] parallel = 'fsdp'"):
        load_recipe(tiny_recipe(model={"quantize": "nf4"}, train={"parallel": "fsdp"}))
