"""Expert LoRA in the PEFT format: peft (target_parameters) loads lorafit's adapters with the same logits, lorafit
loads peft's, `lorafit merge` folds the experts into the stacked weights, and what peft cannot read is refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import adapter_config, assert_same, logits, randomize, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorafit.adapter.load import load_adapter
from lorafit.adapter.merge import merge_adapter
from lorafit.adapter.save import save_adapter
from lorafit.errors import LorafitError
from lorafit.model.inject import inject_lora, lora_layers

peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 8.0
PREFIX = "base_model.model.model.layers.0.mlp.experts."


def lorafit_adapter(arch: str, folder, targets: list[str], **options):
    model = tiny_model(arch)
    randomize(inject_lora(model, targets, RANK, ALPHA, **options))
    save_adapter(model, folder, base_model="tiny", targets=targets)
    return model


@pytest.mark.parametrize("arch, targets", [("qwen3_moe", ["q", "v", "experts"]), ("mixtral", ["experts"]),
                                           ("gpt_oss", ["all-linear"]), ("deepseek_v3", ["q", "v", "experts"])])
def test_peft_loads_our_expert_adapter_with_the_same_logits(arch, targets, tmp_path, tokens):
    ours = logits(lorafit_adapter(arch, tmp_path, targets), tokens)
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    assert_same(logits(theirs, tokens), ours)
    assert (ours - logits(tiny_model(arch), tokens)).abs().max() > 1e-2
    reloaded = tiny_model(arch)
    load_adapter(reloaded, tmp_path)
    assert_same(logits(reloaded, tokens), ours)


def test_expert_adapter_files_are_peft_target_parameters(tmp_path):
    """One module's two stacks nest as peft nests them: gate_up_proj (registered first) inside, as base_layer."""
    model = lorafit_adapter("mixtral", tmp_path, ["down", "gate_up"])
    config = adapter_config(tmp_path)
    assert config["target_modules"] == [] and config["target_parameters"] == ["down_proj", "gate_up_proj"]
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (RANK, ALPHA, 0.0)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    layers = lora_layers(model)
    for key, name in (("base_layer.", "gate_up_proj"), ("", "down_proj")):
        layer = layers[f"model.layers.0.mlp.experts.{name}"]
        a, b = tensors[f"{PREFIX}{key}lora_A.weight"], tensors[f"{PREFIX}{key}lora_B.weight"]
        d_out, d_in = layer.weight_shape
        assert a.shape == (4 * RANK, d_in) and b.shape == (d_out, RANK * 4)
        for e in range(4):  # peft: expert e's A in rows e·r.., its B in columns j·experts + e
            assert torch.equal(a[e * RANK:(e + 1) * RANK], layer.lora_A[e].detach())
            assert torch.equal(b[:, e::4], layer.lora_B[e].detach())
    facts = json.loads((tmp_path / "lorafit.json").read_text())["modules"]
    assert facts["model.layers.0.mlp.experts.down_proj"]["experts"] == 4


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_lorafit_loads_peft_written_expert_adapters_with_peft_logits(arch, tmp_path, tokens):
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj"], init_lora_weights=False,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_model(arch), config).eval()
    theirs.save_pretrained(tmp_path)
    ours = tiny_model(arch)
    layers = load_adapter(ours, tmp_path)
    assert sum(isinstance(key, str) and key.endswith("_proj") and "experts" in key for key in layers) >= 2
    assert_same(logits(ours, tokens), logits(theirs, tokens))
    assert (logits(ours, tokens) - logits(tiny_model(arch), tokens)).abs().max() > 1e-2


def test_merge_folds_expert_lora_into_the_saved_stacks(tmp_path, tokens):
    base = tmp_path / "base"
    tiny_model("qwen3_moe").save_pretrained(base)
    adapted = lorafit_adapter("qwen3_moe", tmp_path / "adapter", ["q", "v", "experts"])
    result = merge_adapter(str(base), tmp_path / "adapter", tmp_path / "merged", force=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert merged.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 48, 32)
    assert_same(logits(merged, tokens), logits(adapted, tokens))
    assert result["max_logit_diff"] < 1e-4


def test_dora_on_the_experts_is_refused_in_one_line():
    with pytest.raises(LorafitError, match="variant 'dora' adapts linear layers only; leave the expert parameters"):
        inject_lora(tiny_model("mixtral"), ["q", "experts"], RANK, ALPHA, variant="dora")


def test_a_peft_adapter_whose_experts_do_not_fit_is_refused(tmp_path):
    lorafit_adapter("mixtral", tmp_path, ["experts"])
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors[f"{PREFIX}lora_A.weight"] = torch.ones(3 * RANK, 24)  # three experts' A for a stack of four
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = tiny_model("mixtral")
    with pytest.raises(LorafitError, match="do not fit its 4 experts of 32 x 24"):
        load_adapter(model, tmp_path)
    assert not lora_layers(model)


def test_modules_peft_would_take_for_experts_are_named_in_a_note(tmp_path, tokens):
    """peft moves target_modules down_proj of DeepSeek-V3 to its experts' stacks (an adapter from transformers 4):
    the dense layer's and the shared experts' LoRA then load in lorafit only, and info says so."""
    from lorafit.recipe import validate
    from lorafit.report.counts import wrap_with_notes

    lora = validate({"lora": {"targets": ["q", "down"]}}).lora
    _, notes = wrap_with_notes(tiny_model("deepseek_v3"), lora)
    assert any("model.layers.0.mlp.down_proj and 1 more modules so named loads in lorafit but not in peft" in text
               for text in notes), notes
    ours = lorafit_adapter("deepseek_v3", tmp_path, ["q", "down"])
    reloaded = tiny_model("deepseek_v3")
    load_adapter(reloaded, tmp_path)
    assert_same(logits(reloaded, tokens), logits(ours, tokens))
