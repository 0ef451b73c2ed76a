"""Adapters in the PEFT format: peft loads ours with the same logits, and lorafit loads what peft wrote."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ALPHA, RANK, adapted, adapter_config, assert_same, logits, peft_logits, peft_written, tiny_model
from safetensors import safe_open

from lorafit.adapter.load import load_adapter, read_adapter_config
from lorafit.adapter.save import save_adapter

peft = pytest.importorskip("peft")


def assert_changed(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() > 1e-2


# ---------------------------------------------------------------- lorafit -> peft


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_peft_loads_our_adapter_with_the_same_logits(arch, tmp_path, tokens):
    model, _ = adapted(arch, ["q", "v"])
    save_adapter(model, tmp_path / "adapter", base_model="tiny", targets=["q", "v"])

    ours = logits(model, tokens)
    assert_same(peft_logits(arch, tmp_path / "adapter", tokens), ours)
    assert_changed(ours, logits(tiny_model(arch), tokens))


def k_features(arch: str, b: torch.Tensor) -> torch.Tensor:
    """The k features of a fused qkv B, from the layouts as the models define them."""
    if arch == "gpt2":  # [q | k | v], each hidden_size wide
        return b[32:64]
    return b.view(4, 3, 8, -1)[:, 1]  # GPT-NeoX: per head [q, k, v] of head_dim 8


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_fused_qv_adapter_is_one_rank_2r_lora_with_zero_k_features(arch, tmp_path):
    model, layers = adapted(arch, ["q", "v"])
    save_adapter(model, tmp_path, base_model="tiny", targets=["q", "v"])

    config = adapter_config(tmp_path)
    assert (config["r"], config["lora_alpha"]) == (2 * RANK, 2 * ALPHA)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as weights:
        for path, layer in layers.items():
            a = weights.get_tensor(f"base_model.model.{path}.lora_A.weight")
            b = weights.get_tensor(f"base_model.model.{path}.lora_B.weight")
            assert a.dtype == b.dtype == torch.float32
            assert b.shape == (96, 2 * RANK)
            assert torch.equal(a, layer.lora_A.detach())
            assert not k_features(arch, b).any()
            assert b.abs().sum() > 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rslora_alpha_gives_peft_the_same_scaling(arch, tmp_path, tokens):
    model, layers = adapted(arch, ["q", "v"], use_rslora=True)
    save_adapter(model, tmp_path, base_model="tiny", targets=["q", "v"])

    config = adapter_config(tmp_path)
    assert config["use_rslora"] is True
    peft_model = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    for path in layers:
        peft_layer = peft_model.base_model.model.get_submodule(path)
        # peft scales by lora_alpha/sqrt(R) with its R; ours is alpha/sqrt(r) per slice.
        assert peft_layer.scaling["default"] == pytest.approx(ALPHA / math.sqrt(RANK), rel=1e-12)
    assert_same(logits(peft_model, tokens), logits(model, tokens))


def test_q_v_o_on_gpt2_selects_attention_modules_only_with_a_rank_pattern(tmp_path, tokens):
    model, layers = adapted("gpt2", ["q", "v", "o"])
    save_adapter(model, tmp_path, base_model="tiny", targets=["q", "v", "o"])

    config = adapter_config(tmp_path)
    assert set(config["rank_pattern"].values()) | {config["r"]} == {RANK, 2 * RANK}
    peft_model = peft.PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path).eval()
    wrapped = {
        path.removeprefix("base_model.model.")
        for path, module in peft_model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    assert wrapped == set(layers)  # attn.c_proj yes, mlp.c_proj no
    ours = logits(model, tokens)
    assert_same(logits(peft_model, tokens), ours)
    reloaded = tiny_model("gpt2")
    load_adapter(reloaded, tmp_path)
    assert_same(logits(reloaded, tokens), ours)


# ---------------------------------------------------------------- peft -> lorafit


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha-over-r", "rslora"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_lorafit_reproduces_an_adapter_written_by_peft(arch, use_rslora, tmp_path, tokens):
    peft_model = peft_written(arch, tmp_path, use_rslora=use_rslora)
    expected = logits(peft_model, tokens)

    model = tiny_model(arch)
    layers = load_adapter(model, tmp_path)
    assert len(layers) == (4 if arch == "llama" else 2)
    assert_same(logits(model, tokens), expected)
    assert_changed(expected, logits(tiny_model(arch), tokens))


def test_peft_rank_pattern_alpha_pattern_and_regex_targets_are_honoured(tmp_path, tokens):
    peft_model = peft_written(
        "llama",
        tmp_path,
        target_modules=r".*\.(q_proj|o_proj)",
        rank_pattern={"o_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 3},
    )
    model = tiny_model("llama")
    layers = load_adapter(model, tmp_path)
    assert layers["model.layers.0.self_attn.o_proj"].rank == 2
    assert layers["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(3 / RANK)
    expected = logits(peft_model, tokens)
    assert_same(logits(model, tokens), expected)

    # Saved again, one q_proj differs in alpha from the other: it gets a full-path pattern of its own.
    save_adapter(model, tmp_path / "again", base_model="tiny", targets=["q_proj", "o_proj"])
    assert adapter_config(tmp_path / "again")["alpha_pattern"] == {r"model\.layers\.1\.self_attn\.q_proj": 3}
    assert_same(peft_logits("llama", tmp_path / "again", tokens), expected)


def test_peft_q_v_o_rank_pattern_round_trips_through_lorafit(tmp_path, tokens):
    """GPT-2 q, v, o as peft users write it: c_attn at rank 2r, attn.c_proj at r."""
    peft_model = peft_written(
        "gpt2", tmp_path / "peft", target_modules=["c_attn", "attn.c_proj"], r=2 * RANK,
        rank_pattern={"attn.c_proj": RANK}, alpha_pattern={"attn.c_proj": 5},
    )
    model = tiny_model("gpt2")
    load_adapter(model, tmp_path / "peft")
    save_adapter(model, tmp_path / "again", base_model="tiny", targets=["c_attn", "attn.c_proj"])

    expected = logits(peft_model, tokens)
    assert_same(logits(model, tokens), expected)
    assert_same(peft_logits("gpt2", tmp_path / "again", tokens), expected)


def test_read_adapter_config_accepts_what_peft_wrote(tmp_path):
    peft_written("llama", tmp_path)
    config = read_adapter_config(tmp_path)
    assert config["peft_type"] == "LORA" and config["r"] == RANK
