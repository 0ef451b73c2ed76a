"""The PEFT format as data, without a model: pattern lookup, alpha translation, key parsing, config refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lorafit.adapter.format import (
    adapter_config,
    check_config,
    check_selected,
    lora_tensors,
    lorafit_alpha,
    pattern_value,
    peft_alpha,
    rank_and_alpha,
    selecting_suffixes,
    weight_key,
)
from lorafit.errors import LorafitError

peft = pytest.importorskip("peft")
from peft.tuners.tuners_utils import check_target_module_exists  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

SOURCE = Path("adapter")
PATHS = [f"model.layers.{i}.self_attn.{name}" for i in range(2) for name in ("q_proj", "o_proj", "xo_proj")]
PATTERNS = {"o_proj": 2, r"layers\.1\.self_attn\.q_proj": 3}


def peft_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """LoraLayer.update_layer's scaling, written out."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@pytest.mark.parametrize("path", PATHS)
def test_pattern_value_finds_the_key_peft_finds(path):
    key = get_pattern_key(list(PATTERNS), path)
    assert pattern_value(PATTERNS, path, 8) == PATTERNS.get(key, 8)


def test_pattern_value_refuses_an_invalid_regex():
    with pytest.raises(LorafitError, match="not a valid regex"):
        pattern_value({"q_proj[": 2}, "model.q_proj", 8)


@pytest.mark.parametrize("peft_rslora", [False, True], ids=["peft-alpha-over-r", "peft-rslora"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["ours-alpha-over-r", "ours-rslora"])
@pytest.mark.parametrize("n_slices", [1, 2, 3])
def test_peft_alpha_gives_peft_our_scaling(n_slices, use_rslora, peft_rslora):
    alpha, rank = 16.0, 4
    translated = peft_alpha(alpha, rank, n_slices, use_rslora=use_rslora, peft_rslora=peft_rslora)
    ours = peft_scaling(alpha, rank, use_rslora)  # one slice's scaling is the layer's scaling
    assert peft_scaling(translated, n_slices * rank, peft_rslora) == pytest.approx(ours, rel=1e-12)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lorafit_alpha_undoes_peft_alpha(use_rslora):
    translated = peft_alpha(5.0, 4, 3, use_rslora=use_rslora, peft_rslora=use_rslora)
    assert lorafit_alpha(translated, 3, use_rslora) == pytest.approx(5.0, rel=1e-12)


def test_lora_tensors_reads_peft_keys_with_or_without_prefix_and_adapter_name():
    a, b = torch.ones(2, 3, dtype=torch.bfloat16), torch.zeros(5, 2)
    tensors = {
        weight_key("h.0.attn", "A"): a,
        weight_key("h.0.attn", "B"): b,
        "h.1.attn.lora_A.default.weight": a,
        "h.1.attn.lora_B.default.weight": b,
        "h.1.attn.lora_magnitude_vector.default.weight": torch.ones(5),
        "wte.lora_embedding_A.default": a,
        "base_model.model.wte.lora_embedding_B": b,
    }
    layers = lora_tensors(tensors, SOURCE)
    assert set(layers) == {"h.0.attn", "h.1.attn", "wte"}
    assert all(x.dtype == torch.float32 for _, parts in layers.values() for x in parts.values())
    kind, parts = layers["h.1.attn"]
    assert kind == "linear" and {p: tuple(x.shape) for p, x in parts.items()} == {"A": (2, 3), "B": (5, 2), "magnitude": (5,)}
    assert layers["wte"][0] == "embedding" and set(layers["wte"][1]) == {"A", "B"}


def test_weight_keys_are_the_ones_peft_saves():
    assert weight_key("m", "A") == "base_model.model.m.lora_A.weight"
    assert weight_key("m", "magnitude") == "base_model.model.m.lora_magnitude_vector"
    assert weight_key("wte", "B", "embedding") == "base_model.model.wte.lora_embedding_B"


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({weight_key("h.0", "A"): torch.ones(2, 3)}, "no lora_B for h.0"),
        ({"base_model.model.h.0.lora_magnitude_vector": torch.ones(3)}, "no lora_A for h.0"),
        ({"base_model.model.h.0.lora_bias.weight": torch.ones(3)}, "not a LoRA A or B"),
        ({weight_key("h.0", "A"): torch.ones(2, 3), weight_key("h.0", "B", "embedding"): torch.ones(3, 2)}, "mixes"),
        ({}, "no LoRA weights"),
    ],
    ids=["missing-B", "magnitude-alone", "bias", "mixed-kinds", "empty"],
)
def test_lora_tensors_refuses_what_is_not_a_lora(tensors, message):
    with pytest.raises(LorafitError, match=message):
        lora_tensors(tensors, SOURCE)


PLAIN = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none"}
REFUSED_CONFIGS = {
    "not-lora": ({"peft_type": "IA3"}, "LoRA adapters only"),
    "bias": ({"bias": "all"}, "bias"),
    "pissa": ({"init_lora_weights": "pissa"}, "changes the base weights"),
    "zero-rank": ({"r": 0}, "positive integer"),
    "bool-rank": ({"r": True}, "positive integer"),
    "text-alpha": ({"lora_alpha": "16"}, "non-numeric lora_alpha"),
    "no-targets": ({"target_modules": None}, "no target_modules"),
    "pattern-list": ({"rank_pattern": ["o_proj"]}, "rank_pattern"),
    "zero-alpha": ({"lora_alpha": 0}, "lora_alpha = 0; it must be positive"),
    "negative-pattern-alpha": ({"alpha_pattern": {"o_proj": -8}}, "lora_alpha = -8; it must be positive"),
    "bool-alpha": ({"lora_alpha": True}, "non-numeric lora_alpha"),
    "some-layers": ({"layers_to_transform": [0]}, "uses layers_to_transform"),
}


def test_check_config_accepts_a_plain_lora():
    check_config(SOURCE, PLAIN)


@pytest.mark.parametrize("case", list(REFUSED_CONFIGS))
def test_check_config_refuses_what_lorafit_cannot_reproduce(case):
    changes, message = REFUSED_CONFIGS[case]
    with pytest.raises(LorafitError, match=message):
        check_config(SOURCE, {**PLAIN, **changes})


@pytest.mark.parametrize("targets", [["o_proj"], ["self_attn.q_proj", "xo_proj"], r".*\.1\..*_proj"], ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_check_selected_agrees_with_peft(targets, path):
    selected = bool(check_target_module_exists(peft.LoraConfig(target_modules=targets), path))
    if selected:
        check_selected(SOURCE, {"target_modules": targets}, path)
    else:
        with pytest.raises(LorafitError, match="does not select"):
            check_selected(SOURCE, {"target_modules": targets}, path)


GPT2_PATHS = ["", "h", "h.0", "h.0.attn", "h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp", "h.0.mlp.c_proj"]


def test_selecting_suffixes_disambiguate_and_skip_the_inside_of_wrapped_modules():
    inside = ["h.0.attn.c_proj.base", "h.0.attn.c_proj.dropout"]
    assert selecting_suffixes(GPT2_PATHS + inside, ["h.0.attn.c_proj"]) == {"h.0.attn.c_proj": "attn.c_proj"}
    both = selecting_suffixes(GPT2_PATHS, ["h.0.attn.c_proj", "h.0.mlp.c_proj"])
    assert set(both.values()) == {"c_proj"}


def test_adapter_config_reads_back_every_modules_rank_and_alpha():
    values = {path: (8, 16) for path in PATHS}
    values["model.layers.1.self_attn.o_proj"] = (4, 16)
    values["model.layers.0.self_attn.q_proj"] = (8, 5.5)
    suffixes = {path: path.rsplit(".", 1)[-1] for path in PATHS}
    config = adapter_config(
        values, suffixes, base_model="tiny", use_rslora=False, fan_in_fan_out=False, dropout=0.0
    )
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    check_config(SOURCE, config)
    for path, (rank, alpha) in values.items():
        assert rank_and_alpha(config, path, rank) == (rank, alpha)
        check_selected(SOURCE, config, path)
