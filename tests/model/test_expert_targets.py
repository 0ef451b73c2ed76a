"""LoRA on the experts of tiny mixture-of-experts models (transformers 5: stacked 3-D expert weights behind a router):
what the targets name, logits against the models' own forward with dense W + scaling·B·A weights, and what
"all-linear" adapts and says it left out."""

from __future__ import annotations

import pytest
import torch
from conftest import MOE, assert_same, logits, randomize, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from lorafit.errors import LorafitError
from lorafit.lora.experts import ExpertLoRA
from lorafit.model.inject import find_sites, inject_lora, lora_layers, merge_lora, target_notes

RANK, ALPHA = 4, 8.0


def expert_layers(layers: dict) -> dict[str, ExpertLoRA]:
    return {key: layer for key, layer in layers.items() if isinstance(layer, ExpertLoRA)}


def dense_model(arch: str, layers: dict[str, ExpertLoRA], implementation: str | None = None):
    """The base model with each adapted stack replaced by W_e + (alpha/r)·B_e·A_e, expert by expert."""
    model = tiny_model(arch)
    if implementation:
        model.config._experts_implementation = implementation
    with torch.no_grad():
        for key, layer in layers.items():
            weight = model.get_parameter(key)
            for e in range(weight.shape[0]):
                delta = (ALPHA / RANK) * layer.lora_B[e] @ layer.lora_A[e]  # [d_out, d_in]
                weight[e] += delta.t() if arch == "gpt_oss" else delta  # gpt-oss stores [experts, d_in, d_out]
    return model


@pytest.mark.parametrize("arch", MOE)
def test_expert_lora_with_b_zero_leaves_the_logits_of_the_base(arch, tokens):
    model = tiny_model(arch)
    before = logits(model, tokens)
    layers = inject_lora(model, ["q", "v", "experts"], RANK, ALPHA)
    assert len(expert_layers(layers)) == sum(parameter.ndim == 3 for parameter in tiny_model(arch).parameters()) > 0
    assert torch.equal(logits(model, tokens), before)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_expert_lora_logits_are_the_dense_per_expert_update(arch, implementation, tokens):
    """Whichever of transformers' expert implementations runs the stacks (a loop over experts, bmm, grouped mm)."""
    model = tiny_model(arch)
    model.config._experts_implementation = implementation
    layers = inject_lora(model, ["experts"], RANK, ALPHA)
    randomize(layers)
    ours = logits(model, tokens)
    assert_same(ours, logits(dense_model(arch, expert_layers(layers), implementation), tokens))
    assert (ours - logits(tiny_model(arch), tokens)).abs().max() > 1e-2


def test_semantic_names_reach_the_stacks_and_the_dense_layers_of_qwen3_moe():
    """Its first layer is sparse, its second dense: down is a stack there and a linear layer here."""
    model = tiny_model("qwen3_moe")
    keys = {site.key for site in find_sites(model, ["down"])}
    assert keys == {"model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.down_proj"}
    assert {site.key for site in find_sites(model, ["gate_up"])} == {"model.layers.0.mlp.experts.gate_up_proj"}
    both = find_sites(model, ["experts", "down"])  # the same stack named twice is adapted once
    assert sorted(site.key for site in both) == sorted(
        ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.down_proj"])


def test_gate_on_mixtral_is_refused_not_taken_for_the_router():
    with pytest.raises(LorafitError, match="experts' gate and up are one stacked parameter.*target gate_up"):
        find_sites(tiny_model("mixtral"), ["gate"])


def test_the_router_trains_only_when_named(tokens):
    model = tiny_model("mixtral")
    assert not any("mlp.gate" in key for key in inject_lora(model, ["all-linear"], RANK, ALPHA))
    model = tiny_model("mixtral")
    layers = inject_lora(model, ["mlp.gate"], RANK, ALPHA)
    assert set(layers) == {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    assert all(layer.experts == 1 and layer.weight_shape == (4, 32) for layer in layers.values())
    randomize(layers)
    assert (logits(model, tokens) - logits(tiny_model("mixtral"), tokens)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_all_linear_adapts_the_experts_and_names_the_routers_it_leaves_out(arch):
    model = tiny_model(arch)
    keys = {site.key for site in find_sites(model, ["all-linear"])}
    stacks = {name for name, parameter in model.named_parameters() if parameter.ndim == 3}
    assert stacks and stacks <= keys
    notes = target_notes(model, ["all-linear"], dropout=0.05)
    routers = sum(name.endswith("mlp.gate") for name, _ in model.named_modules())
    assert any(f"adapts the experts' stacked weights too ({len(stacks)} in all" in text for text in notes)
    assert any("leaves out" in text and f"mlp.gate ({type(model.model.layers[0].mlp.gate).__name__}) ×{routers}" in text
               for text in notes)
    assert any("dropout = 0.05 is not applied" in text for text in notes)
    assert target_notes(tiny_model("llama"), ["all-linear"], dropout=0.05) == []  # nothing passed over there


def test_merge_folds_expert_lora_into_the_stacks(tokens):
    model = tiny_model("qwen3_moe")
    layers = inject_lora(model, ["q", "experts"], RANK, ALPHA)
    randomize(layers)
    adapted = logits(model, tokens)
    merge_lora(model)
    assert not lora_layers(model) and type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    assert_same(logits(model, tokens), adapted)


def test_nesting_follows_the_modules_order_whatever_the_targets_order():
    """peft nests one module's parameter wrappers in the module's order; the adapter file's keys depend on it."""
    for order in (["down", "gate_up"], ["gate_up", "down"]):
        model = tiny_model("mixtral")
        inject_lora(model, order, RANK, ALPHA)
        outer = model.model.layers[0].mlp.experts
        assert (outer.parameter, outer.base.parameter) == ("down_proj", "gate_up_proj")


def test_meta_model_wraps_the_same_stacks():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))
    layers = inject_lora(model, ["experts"], RANK, ALPHA)
    assert {key: layer.lora_params for key, layer in layers.items()} == {
        "model.layers.0.mlp.experts.gate_up_proj": 4 * RANK * (32 + 48),
        "model.layers.0.mlp.experts.down_proj": 4 * RANK * (24 + 32),
    }


def test_an_svd_start_on_the_experts_is_refused_before_any_weight_is_read():
    """The check that `train` runs on the meta device: PiSSA starts from a linear layer's SVD, not a stack's."""
    from lorafit.recipe import validate
    from lorafit.train.preflight import check_lora

    recipe = validate({"lora": {"targets": ["q", "experts"], "init": "pissa"}})
    with pytest.raises(LorafitError, match="init = 'pissa' starts from a linear layer's SVD and does not apply to "
                                           "expert parameters"):
        check_lora(tiny_config("mixtral"), recipe)
