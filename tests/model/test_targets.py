"""The architecture table against the models' own code: the output features it calls q, k, v, gate and up are
the features the transformers forward pass uses as q, k, v, gate and up.

Method: capture the tensors each model passes to its attention function (or, for BLOOM, returns from its
own split) and, for Phi-3's MLP, the gate and up halves; then ask autograd which output features of the fused
projection each captured tensor depends on. Rotary embeddings mix features within q and within k, never
across q, k and v, so the dependence sets are exactly the features the model assigns to each part.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, MOE, tiny_config, tiny_model
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lorafit.model import targets
from lorafit.model.inject import is_projection

CAPTURE = "lorafit_test_capture"
_captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention implementation that records (q, k, v) as the model split them, then runs sdpa."""
    _captured.append((query, key, value))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE, _capture_attention)

# Layer 0's fused q/k/v projection, named here rather than taken from the table under test.
FUSED_QKV = {
    "gpt2": "transformer.h.0.attn.c_attn",
    "gpt_neox": "gpt_neox.layers.0.attention.query_key_value",
    "bloom": "transformer.h.0.self_attention.query_key_value",
    "phi3": "model.layers.0.self_attn.qkv_proj",
}


def sample_tokens() -> torch.Tensor:
    return torch.randint(2, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def output_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Hook that keeps the module's first output (the fused projection of layer 0)."""
    kept: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        kept.setdefault("out", output)

    module.register_forward_hook(hook)
    return kept


def features_feeding(part: torch.Tensor, fused: torch.Tensor) -> list[int]:
    """Output features (last dim) of `fused` that `part` depends on; random weights rule out cancellation."""
    weights = torch.randn(part.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((part * weights).sum(), fused, retain_graph=True)
    return grad.abs().flatten(0, -2).sum(0).nonzero().flatten().tolist()


def capture_qkv(model: nn.Module, arch: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run the model once; return layer 0's (q, k, v) as its attention code splits them, and the fused output."""
    fused = output_of(model.get_submodule(FUSED_QKV[arch]))
    split: dict[str, tuple] = {}
    if arch == "bloom":
        attention = model.get_submodule(FUSED_QKV[arch].rpartition(".")[0])
        own_reshape = attention._reshape

        def recording_reshape(fused_qkv):
            parts = own_reshape(fused_qkv)
            split.setdefault("qkv", parts)
            return parts

        attention._reshape = recording_reshape
    else:
        _captured.clear()
        model.set_attn_implementation(CAPTURE)
    model(sample_tokens())
    query, key, value = split["qkv"] if arch == "bloom" else _captured[0]
    return {"q": query, "k": key, "v": value}, fused["out"]


@pytest.mark.parametrize("arch", sorted(FUSED_QKV))
def test_qkv_features_are_the_features_the_model_uses(arch):
    model = tiny_model(arch)
    table = targets.ARCHITECTURES[arch]
    parts, fused = capture_qkv(model, arch)
    for name, part in parts.items():
        assert FUSED_QKV[arch].endswith("." + table[name].module)
        expected = features_feeding(part, fused)
        assert sorted(table[name].features(model.config)) == expected, f"{arch} {name}"


class RecordGate(nn.Module):
    """Stands in for the activation: records its input (the gate half) and passes ones on, so the
    product the MLP forms is exactly its up half."""

    def __init__(self, kept: dict[str, torch.Tensor]):
        super().__init__()
        self.kept = kept

    def forward(self, gate: torch.Tensor) -> torch.Tensor:
        self.kept.setdefault("gate", gate)
        return torch.ones_like(gate).detach()


def test_phi3_gate_and_up_features_are_the_halves_the_mlp_uses():
    model = tiny_model("phi3")
    mlp = model.get_submodule("model.layers.0.mlp")
    fused = output_of(mlp.gate_up_proj)
    kept: dict[str, torch.Tensor] = {}
    mlp.activation_fn = RecordGate(kept)
    mlp.down_proj.register_forward_pre_hook(lambda _m, args: kept.setdefault("up", args[0]))
    model(sample_tokens())

    table = targets.ARCHITECTURES["phi3"]
    for name in ("gate", "up"):
        assert table[name].module == "mlp.gate_up_proj"
        assert sorted(table[name].features(model.config)) == features_feeding(kept[name], fused["out"]), name


def test_fused_targets_of_one_module_are_disjoint_and_cover_it():
    for arch, table in targets.ARCHITECTURES.items():
        model = tiny_model(arch)
        by_module: dict[str, list[int]] = {}
        for target in table.values():
            if target.features is not None:
                by_module.setdefault(target.module, []).extend(target.features(model.config))
        for suffix, features in by_module.items():
            layer = next(m for path, m in model.named_modules() if path.endswith("." + suffix))
            d_out = layer.weight.shape[1] if type(layer).__name__ == "Conv1D" else layer.weight.shape[0]
            assert sorted(features) == list(range(d_out)), f"{arch} {suffix}"


def test_every_table_architecture_has_a_tiny_model():
    assert set(targets.ARCHITECTURES) <= set(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_semantic_target_names_one_projection_per_layer(arch):
    """In a mixture-of-experts model gate, up and down name the dense MLP of a layer that has one (a stack of
    experts is a parameter, not a module): one per layer at most there, one per layer for the attention."""
    model = tiny_model(arch)
    table = targets.architecture(arch)
    assert table, f"no table entry for {arch}"
    assert set(table) <= set(targets.SEMANTIC_TARGETS)
    layers = model.config.num_hidden_layers
    for name, target in table.items():
        found = [m for path, m in model.named_modules() if path.endswith("." + target.module)]
        dense_mlp = arch in MOE and name in ("gate", "up", "down")
        assert 1 <= len(found) <= layers if dense_mlp else len(found) == layers, f"{arch} {name} -> {target.module}"
        assert all(is_projection(m) for m in found)


def test_unknown_architecture_has_no_semantic_targets():
    assert targets.architecture("no-such-model") == {}


def test_fused_slices_are_in_feature_order_whatever_the_request_order():
    config = tiny_config("gpt2")
    forward, backward = targets.fused_slices(config, ["q", "v"]), targets.fused_slices(config, ["v", "q"])
    assert list(forward.items()) == list(backward.items())
    d = config.n_embd
    assert forward == {"q": list(range(0, d)), "v": list(range(2 * d, 3 * d))}


@pytest.mark.parametrize("names", [[], ["o"], ["q", "o"], ["c_attn"]], ids=str)
def test_fused_slices_need_every_name_to_be_a_fused_target(names):
    assert targets.fused_slices(tiny_config("gpt2"), names) is None


@pytest.mark.parametrize(
    "path, suffix, selected",
    [("h.0.attn.c_proj", "attn.c_proj", True), ("c_proj", "c_proj", True), ("h.0.attn.c_proj", "n.c_proj", False)],
)
def test_a_suffix_names_whole_dotted_parts_only(path, suffix, selected):
    assert targets.matches_suffix(path, suffix) == selected


def test_deepseek_latent_attention_q_k_v_are_the_features_its_attention_uses():
    """Multi-head latent attention: q is all of q_b_proj; k (without its shared rotary part) and v are the per-head
    features of kv_b_proj, the latent's up-projection, that the attention takes as keys and values."""
    model = tiny_model("deepseek_v3")
    attention = "model.layers.0.self_attn"
    latent = output_of(model.get_submodule(f"{attention}.kv_b_proj"))
    query = output_of(model.get_submodule(f"{attention}.q_b_proj"))
    _captured.clear()
    model.set_attn_implementation(CAPTURE)
    model(sample_tokens())
    q, k, v = _captured[0]
    table = targets.ARCHITECTURES["deepseek_v3"]
    assert (table["q"].module, table["k"].module, table["v"].module) == (
        "self_attn.q_b_proj", "self_attn.kv_b_proj", "self_attn.kv_b_proj")
    assert features_feeding(q, query["out"]) == list(range(query["out"].shape[-1]))
    assert sorted(table["k"].features(model.config)) == features_feeding(k, latent["out"])
    assert sorted(table["v"].features(model.config)) == features_feeding(v, latent["out"])
