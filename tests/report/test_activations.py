"""The activation estimate of `info`, the dry run and gradient checkpointing = "auto", against a real forward."""

from __future__ import annotations

import io

import pytest
import torch
import transformers
from conftest import tiny_config

from lorafit.lora.dropout import keyed_dropout
from lorafit.model.inject import wrap_targets
from lorafit.model.load import fuse_activations
from lorafit.model.masks import masks_without_host_reads
from lorafit.recipe import LoraSection, Recipe
from lorafit.report.activations import CHUNK_BYTES, activation_estimate
from lorafit.train.preflight import choose_checkpointing

LORA = LoraSection(rank=4, alpha=8, dropout=0.1, targets=["q", "v"])


def saved_by_a_real_forward(config, rows: int, length: int) -> int:
    """Bytes autograd saves in a real LoRA forward of the whole trunk: real weights, every block, no fakes."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    wrap_targets(model, LORA)
    fuse_activations(model)
    model.train()
    weights = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    ids = torch.randint(2, config.vocab_size, (rows, length))
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A")}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), masks_without_host_reads(False), \
            keyed_dropout(layers.values(), seed=5, step=3, rows=range(rows), shape=(rows, length)):
        model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return sum(saved.values())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_estimate_counts_what_a_real_forward_of_every_block_saves(arch):
    config = tiny_config(arch)
    config.num_hidden_layers = 4
    estimate = activation_estimate(config, LORA, rows=3, length=12, supervised_fraction=0.0)
    trunk = estimate["total"] - CHUNK_BYTES  # no supervised position: the head keeps only its chunk
    assert trunk == saved_by_a_real_forward(config, rows=3, length=12)
    hidden = 3 * 12 * config.hidden_size * 4
    assert estimate["checkpointed"] < estimate["total"]
    assert estimate["checkpointed"] == estimate["total"] - 4 * estimate["per_block"] + 4 * hidden + estimate["per_block"]


def recipe(checkpointing) -> Recipe:
    return Recipe.model_validate({"lora": LORA.model_dump(), "train": {"gradient_checkpointing": checkpointing,
                                                                       "batch_size": 8},
                                  "data": {"max_length": 32}})


def test_auto_checkpointing_turns_on_only_where_the_activations_would_not_fit(monkeypatch):
    from lorafit.train import preflight

    notes = io.StringIO()
    monkeypatch.setattr(preflight, "note", lambda text, *args: notes.write(text))
    config = tiny_config("gpt2")
    assert choose_checkpointing(recipe("auto"), config, None) is False  # a CPU: no device memory to run out of
    assert choose_checkpointing(recipe("auto"), config, 100 * 2**30) is False
    assert notes.getvalue() == ""
    assert choose_checkpointing(recipe("auto"), config, 2**20) is True
    assert "gradient checkpointing on" in notes.getvalue() and "8 rows of up to 32 tokens" in notes.getvalue()
    assert choose_checkpointing(recipe(True), config, None) is True
    assert choose_checkpointing(recipe(False), config, 2**20) is False


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_a_model_with_stacked_experts_is_estimated_near_what_a_real_fp32_forward_saves(arch):
    """Fake tensors run the experts' grouped matmul in bf16 only, so the estimate runs such a model in bf16 and counts
    its floating tensors at fp32's size; a real fp32 forward (every block, real weights) is the reference."""
    config = tiny_config(arch)
    config.num_hidden_layers = 4
    trunk = activation_estimate(config, LORA, rows=3, length=12, supervised_fraction=0.0)["total"] - CHUNK_BYTES
    assert trunk == pytest.approx(saved_by_a_real_forward(config, rows=3, length=12), rel=0.1)
