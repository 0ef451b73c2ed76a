"""LoRA on embedding tables: equal to a dense update of the table, two-way with peft's lora_embedding_A/B, and
merging one end of tied input/output embeddings never moves the other."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import RANK, assert_same, logits, tiny_model
from torch import nn

from lorafit.adapter.load import load_adapter
from lorafit.adapter.merge import merge_adapter
from lorafit.adapter.save import save_adapter
from lorafit.errors import LorafitError
from lorafit.lora.embedding import LoRAEmbedding
from lorafit.model.inject import inject_lora, lora_layers

VOCAB, D = 50, 8


class ScaledEmbedding(nn.Embedding):
    """Multiplies looked-up rows by embed_scale, as Gemma's embedding does."""

    embed_scale = 2.5

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


def randomized(layer: LoRAEmbedding) -> LoRAEmbedding:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))
    return layer


@pytest.mark.parametrize("table", [nn.Embedding, ScaledEmbedding])
def test_embedding_lora_equals_a_dense_update_of_the_table(table):
    torch.manual_seed(0)
    base = table(VOCAB, D).requires_grad_(False)
    layer = randomized(LoRAEmbedding(base, RANK, 8.0))
    ids = torch.randint(0, VOCAB, (3, 7))
    scale = getattr(base, "embed_scale", 1.0)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    dense_table = base.weight + layer.scaling * (b @ a).t()  # [vocab, d]
    assert_same(layer(ids), nn.functional.embedding(ids, dense_table) * scale)
    with torch.no_grad():
        layer.merge()
        assert_same(base(ids), nn.functional.embedding(ids, dense_table) * scale)


def test_embedding_lora_starts_at_the_base_and_trains_only_looked_up_columns():
    base = nn.Embedding(VOCAB, D).requires_grad_(False)
    layer = LoRAEmbedding(base, RANK, 8.0)
    ids = torch.tensor([[3, 5, 5]])
    assert torch.equal(layer(ids), base(ids))
    layer(ids).sum().backward()
    touched = layer.lora_A.grad.abs().sum(0).nonzero().flatten().tolist()
    assert touched == [3, 5]  # a lookup of A's columns, no dense [vocab, d] update in the graph


@pytest.mark.parametrize("arch, targets", [("gpt2", ["embed", "q", "v"]), ("llama", ["embed_tokens", "q"])])
def test_peft_loads_our_embedding_adapter_with_the_same_logits(arch, targets, tmp_path, tokens):
    import peft

    model = tiny_model(arch)
    base = logits(model, tokens)
    layers = inject_lora(model, targets, RANK, 8.0)
    assert any(isinstance(layer, LoRAEmbedding) for layer in layers.values())
    assert torch.equal(logits(model, tokens), base)  # B random, A zero: the adapter starts at the base
    for layer in layers.values():
        with torch.no_grad():
            layer.lora_A.normal_(0, 0.5)
            layer.lora_B.normal_(0, 0.5)
    save_adapter(model, tmp_path, base_model="tiny", targets=targets)
    ours = logits(model, tokens)
    assert (ours - base).abs().max() > 1e-2
    assert_same(logits(peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval(), tokens), ours)
    reloaded = tiny_model(arch)
    load_adapter(reloaded, tmp_path)
    assert_same(logits(reloaded, tokens), ours)


def test_we_load_a_peft_embedding_adapter_with_the_same_logits(tmp_path, tokens):
    import peft

    config = peft.LoraConfig(r=RANK, lora_alpha=8, target_modules=["embed_tokens", "v_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_model("llama"), config).eval()
    theirs.save_pretrained(tmp_path)
    model = tiny_model("llama")
    layers = load_adapter(model, tmp_path)
    assert isinstance(layers["model.embed_tokens"], LoRAEmbedding)
    assert_same(logits(model, tokens), logits(theirs, tokens))


def test_dora_on_an_embedding_is_refused():
    with pytest.raises(LorafitError, match="linear layers only"):
        inject_lora(tiny_model("llama"), ["embed"], RANK, 8.0, variant="dora")


@pytest.mark.parametrize("targets", [["lm_head"], ["embed"]])
def test_merging_one_end_of_tied_embeddings_leaves_the_other_end_alone(targets, tmp_path, tokens):
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    model.save_pretrained(tmp_path / "base")
    layers = inject_lora(model, targets, RANK, 8.0)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.normal_(0, 0.5)
            layer.lora_B.normal_(0, 0.5)
    save_adapter(model, tmp_path / "adapter", base_model="tiny", targets=targets)
    adapter_logits = logits(model, tokens)

    result = merge_adapter(str(tmp_path / "base"), tmp_path / "adapter", tmp_path / "out", force=False)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert result["max_logit_diff"] < 1e-4
    assert_same(logits(merged, tokens), adapter_logits)
    untouched = merged.transformer.wte if targets == ["lm_head"] else merged.lm_head
    assert torch.equal(untouched.weight, tiny_model("gpt2").transformer.wte.weight)
    assert not lora_layers(merged)
