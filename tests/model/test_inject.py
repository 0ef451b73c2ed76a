"""Wrapping a model: base behaviour kept at init, only LoRA trains, counts agree with peft and the paper."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import ARCHITECTURES, gpt2_closed_form, logits, tiny_config, tiny_model
from peft import LoraConfig, get_peft_model
from torch import nn

from lorafit.errors import LorafitError
from lorafit.lora.linear import LoRALinear
from lorafit.model.inject import count_parameters, find_sites, inject_lora, lora_layers, merge_lora
from lorafit.model.targets import architecture

RANK, ALPHA = 4, 8.0
LLAMA_FAMILY = ["llama", "mistral", "qwen2", "qwen3", "opt"]  # separate q_proj / v_proj modules


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B everywhere, so the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=generator))


def all_targets(arch: str) -> list[str]:
    return list(architecture(arch))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("which", ["q,v", "all"])
def test_logits_equal_base_at_init(arch, which, tokens):
    model = tiny_model(arch)
    before = logits(model, tokens)
    chosen = ["q", "v"] if which == "q,v" else all_targets(arch)
    layers = inject_lora(model, chosen, RANK, ALPHA)
    assert layers
    assert torch.equal(logits(model, tokens), before)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_only_lora_parameters_train(arch):
    model = tiny_model(arch)
    inject_lora(model, all_targets(arch), RANK, ALPHA)
    for name, parameter in model.named_parameters():
        is_lora = name.endswith((".lora_A", ".lora_B"))
        assert parameter.requires_grad == is_lora, name


def test_backward_reaches_only_lora(tokens):
    model = tiny_model("gpt2")
    inject_lora(model, ["q", "v", "down"], RANK, ALPHA)
    randomize_lora(model)
    model(tokens, labels=tokens).loss.backward()
    for name, parameter in model.named_parameters():
        if name.endswith((".lora_A", ".lora_B")):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def unique_parameter_count(model: nn.Module) -> int:
    """Parameters counted once per tensor, found independently of parameters()' own de-duplication."""
    unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(p.numel() for p in unique.values())


def test_count_parameters_counts_tied_embeddings_once():
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    listed = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    counts = count_parameters(model)
    assert counts.total == unique_parameter_count(model) == gpt2_closed_form(model.config)
    assert listed - counts.total == model.transformer.wte.weight.numel()
    assert counts.trainable == counts.total  # nothing frozen before injection


def test_count_parameters_after_injection_adds_lora_as_trainable():
    model = tiny_model("gpt2")
    base = unique_parameter_count(model)
    layers = inject_lora(model, ["q", "v"], RANK, ALPHA)
    lora = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in layers.values())
    counts = count_parameters(model)
    assert counts.total == base + lora == unique_parameter_count(model)
    assert counts.trainable == lora
    assert counts.ratio == pytest.approx(lora / (base + lora))


def test_unknown_target_lists_the_valid_ones():
    model = tiny_model("gpt2")
    with pytest.raises(LorafitError) as raised:
        inject_lora(model, ["q", "query"], RANK, ALPHA)
    message = str(raised.value)
    assert "'query'" in message
    for name in architecture("gpt2"):
        assert name in message
    assert "\n" not in message


def test_no_targets_is_an_error():
    with pytest.raises(LorafitError):
        inject_lora(tiny_model("gpt2"), [], RANK, ALPHA)


def test_failed_injection_leaves_the_model_untouched():
    model = tiny_model("gpt2")
    with pytest.raises(LorafitError):
        inject_lora(model, ["q", "nope"], RANK, ALPHA)
    assert not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_module_name_wraps_the_whole_module():
    model = tiny_model("gpt2")
    d = model.config.n_embd
    layers = inject_lora(model, ["c_attn"], RANK, ALPHA)
    assert sorted(layers) == [f"transformer.h.{i}.attn.c_attn" for i in range(model.config.n_layer)]
    for layer in layers.values():
        assert layer.slices is None
        assert tuple(layer.lora_A.shape) == (RANK, d)
        assert tuple(layer.lora_B.shape) == (3 * d, RANK)


def test_dotted_module_name_picks_only_that_module():
    model = tiny_model("gpt2")
    layers = inject_lora(model, ["attn.c_proj"], RANK, ALPHA)
    assert sorted(layers) == [f"transformer.h.{i}.attn.c_proj" for i in range(model.config.n_layer)]
    for block in model.transformer.h:
        assert isinstance(block.attn.c_proj, LoRALinear)
        assert not isinstance(block.mlp.c_proj, LoRALinear)


def test_target_order_does_not_change_the_layout():
    forward = inject_lora(tiny_model("gpt2"), ["q", "v"], RANK, ALPHA)
    backward = inject_lora(tiny_model("gpt2"), ["v", "q"], RANK, ALPHA)
    assert forward.keys() == backward.keys()
    for path in forward:
        assert forward[path].out_index == backward[path].out_index
        assert forward[path].slice_sizes == backward[path].slice_sizes
        assert forward[path].lora_A.shape == backward[path].lora_A.shape
    d = tiny_config("gpt2").n_embd
    features = list(forward["transformer.h.0.attn.c_attn"].out_index)
    assert features == list(range(0, d)) + list(range(2 * d, 3 * d))  # q features first, then v; k untouched


@pytest.mark.parametrize("chosen", [["c_attn", "q"], ["q", "c_attn"], ["q_proj", "q"]], ids=str)
def test_whole_module_and_slice_on_the_same_module_overlap(chosen):
    arch = "llama" if "q_proj" in chosen else "gpt2"
    with pytest.raises(LorafitError, match="overlap"):
        find_sites(tiny_model(arch), chosen)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "phi3", "llama"])
def test_merge_lora_restores_plain_modules_with_the_same_logits(arch, tokens):
    model = tiny_model(arch)
    base_types = {path: type(m) for path, m in model.named_modules()}
    inject_lora(model, all_targets(arch), RANK, ALPHA)
    randomize_lora(model)
    wrapped = logits(model, tokens)
    merge_lora(model)
    assert not lora_layers(model)
    assert {path: type(m) for path, m in model.named_modules()} == base_types
    torch.testing.assert_close(logits(model, tokens), wrapped, rtol=1e-4, atol=1e-4)


def peft_counts(arch: str, config=None) -> tuple[int, int]:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config or tiny_config(arch))
    wrapped = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"]))
    return wrapped.get_nb_trainable_parameters()


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("arch", LLAMA_FAMILY)
def test_llama_family_counts_match_peft(arch):
    model = tiny_model(arch)
    inject_lora(model, ["q", "v"], RANK, ALPHA)
    counts = count_parameters(model)
    assert (counts.trainable, counts.total) == peft_counts(arch)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_gpt2_qv_count_is_the_paper_formula_and_matches_peft_on_separate_projections():
    config = tiny_config("gpt2")
    model = transformers.AutoModelForCausalLM.from_config(config)
    inject_lora(model, ["q", "v"], RANK, ALPHA)
    d, layers = config.n_embd, config.n_layer
    paper = layers * 2 * RANK * (d + d)  # two adapted matrices of d x d per layer
    assert count_parameters(model).trainable == paper

    # The same shapes with q and v as separate modules: peft adapts q_proj and v_proj of d x d each.
    llama = transformers.LlamaConfig(
        hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
        num_attention_heads=config.n_head, num_key_value_heads=config.n_head, vocab_size=config.vocab_size,
    )
    trainable, _ = peft_counts("llama", llama)
    assert trainable == paper
