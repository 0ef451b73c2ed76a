"""Targets for models the table does not list: conventional module names, fused q/k/v rows checked against the
model's own attention, peft's "all-linear", and errors that show what the model has."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from conftest import LLAMA_SHAPE, SMALL, TINY_MODEL, VOCAB, assert_same, logits, tiny_config, tiny_model, write_recipe
from test_targets import features_feeding, output_of, sample_tokens

from lorafit.adapter.load import load_adapter
from lorafit.errors import LorafitError
from lorafit.model import targets
from lorafit.model.inject import find_sites, inject_lora, linear_paths, lora_layers, model_targets

# Llama-shaped models without a table row, as a user would bring them.
TABLELESS = {
    "gemma": lambda vocab: transformers.GemmaConfig(**LLAMA_SHAPE, head_dim=8, **{**SMALL, "vocab_size": vocab}),
    "olmo": lambda vocab: transformers.OlmoConfig(**LLAMA_SHAPE, **{**SMALL, "vocab_size": vocab}),
    "granite": lambda vocab: transformers.GraniteConfig(**LLAMA_SHAPE, **{**SMALL, "vocab_size": vocab}),
}
FALCON = {
    "grouped": dict(new_decoder_architecture=True, num_kv_heads=2),
    "multi-query": dict(multi_query=True),
    "per-head": dict(multi_query=False),
}


def tableless(arch: str, vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(TABLELESS[arch](vocab)).eval()


def falcon(layout: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **FALCON[layout], **SMALL)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_the_table_lacks_the_tableless_models():
    for arch in [*TABLELESS, "falcon"]:
        assert targets.architecture(arch) == {}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gpt_neox", "bloom"])
def test_conventional_names_give_what_the_table_gives(arch):
    """Pretend the table had no row: the conventional names must find the same modules and fused rows."""
    model = tiny_model(arch)
    widths = {path.rsplit(".", 1)[-1]: m.out_features for path, m in model.named_modules() if hasattr(m, "out_features")}
    conventional = targets.conventional_targets(model.config, widths)
    for name in ("q", "k", "v"):
        table = targets.ARCHITECTURES[arch][name]
        assert table.module.endswith(conventional[name].module)
        if table.features is not None:
            assert conventional[name].features(model.config) == table.features(model.config)


@pytest.mark.parametrize("layout", list(FALCON))
def test_falcon_fused_rows_are_the_rows_its_attention_uses(layout, monkeypatch):
    """The q, k and v that layer 0's attention receives (rotary mixes features within a head only, and repeated
    key/value heads read the same rows), traced back to the fused projection's output features."""
    model = falcon(layout)
    attention = model.transformer.h[0].self_attention
    fused = output_of(attention.query_key_value)
    split = {}
    own_attention = torch.nn.functional.scaled_dot_product_attention

    def attend(query, key, value, *args, **kwargs):
        split.setdefault("qkv", (query, key, value))  # the first call is layer 0's
        return own_attention(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", attend)
    model(sample_tokens())
    found = model_targets(model)
    for name, part in zip("qkv", split["qkv"]):
        assert found[name].module == "query_key_value"
        assert found[name].features(model.config) == features_feeding(part, fused["out"]), (layout, name)


def test_q_and_v_on_falcon_adapt_only_their_fused_rows(tokens):
    model = falcon("grouped")
    before = logits(model, tokens)
    layers = inject_lora(model, ["q", "v"], 4, 8.0)
    assert all(layer.slices is not None and layer.slice_sizes == [32, 16] for layer in layers.values())
    assert torch.equal(logits(model, tokens), before)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "gemma"])
def test_all_linear_adapts_what_peft_adapts(arch):
    import peft

    model = tableless(arch) if arch in TABLELESS else tiny_model(arch)
    ours = set(inject_lora(model, ["all-linear"], 4, 8.0))
    fresh = tableless(arch) if arch in TABLELESS else tiny_model(arch)
    wrapped = peft.get_peft_model(fresh, peft.LoraConfig(r=4, target_modules="all-linear"))
    theirs = {name.removeprefix("base_model.model.") for name, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    assert ours == theirs
    assert not any("lm_head" in path for path in ours)


def tableless_dir(arch: str, folder):
    """A tiny table-less model saved with the shipped tiny model's tokenizer, so `train` runs on it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL)
    tableless(arch, vocab=len(tokenizer)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_MODEL / name, folder / name)
    return folder


@pytest.mark.parametrize(
    "arch, target",
    [("gemma", ["q", "v"]), ("gemma", ["all-linear"]), ("olmo", ["all-linear"]), ("granite", ["q", "v"])],
    ids=["gemma-q,v", "gemma-all-linear", "olmo-all-linear", "granite-q,v"],
)
def test_tableless_models_train_and_peft_loads_the_adapter_with_equal_logits(arch, target, tmp_path, tokens):
    import peft

    from lorafit.train.loop import train

    base_dir = tableless_dir(arch, tmp_path / "base")
    recipe_path = write_recipe(tmp_path, model={"name": str(base_dir)}, lora={"targets": target},
                               train={"max_steps": 2, "batch_size": 2, "lr": 1e-2, "log_every": 1},
                               data={"max_eval_examples": 4})
    from lorafit.recipe import load_recipe

    report = train(load_recipe(recipe_path), console=None)
    assert report["trainable_params"] > 0
    adapter = tmp_path / "run" / "adapter"

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ours = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    layers = load_adapter(ours, adapter)
    assert any(layer.lora_B.abs().sum() > 0 for layer in layers.values())  # it trained
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    assert_same(logits(theirs, tokens), logits(ours, tokens))
    assert (logits(ours, tokens) - logits(base, tokens)).abs().max() > 0


@pytest.mark.parametrize("target", [["q", "v"], ["all-linear"]], ids=["q,v", "all-linear"])
@pytest.mark.parametrize("arch", list(TABLELESS))
def test_zero_b_on_tableless_models_gives_the_base_logits_exactly(arch, target, tokens):
    model = tableless(arch)
    before = logits(model, tokens)
    layers = inject_lora(model, target, 4, 8.0)
    assert len(layers) == (14 if target == ["all-linear"] else 4)
    assert torch.equal(logits(model, tokens), before)


def test_a_target_nothing_matches_lists_the_models_linear_layers():
    with pytest.raises(LorafitError) as raised:
        find_sites(tableless("gemma"), ["query"])
    message = str(raised.value)
    assert "'query'" in message and "all-linear" in message and "\n" not in message
    for name in ("q_proj", "down_proj", "gate_proj"):
        assert name in message
    assert f"({len(linear_paths(tableless('gemma')))} in all)" in message


def test_a_target_that_is_not_linear_says_so():
    with pytest.raises(LorafitError, match="a GemmaRMSNorm, which is neither a linear layer nor an embedding"):
        find_sites(tableless("gemma"), ["input_layernorm"])


def test_all_linear_and_a_semantic_name_on_the_same_module_overlap():
    with pytest.raises(LorafitError, match="overlap"):
        find_sites(tiny_model("llama"), ["all-linear", "q"])


def test_embed_names_the_input_embedding():
    model = tiny_model("llama")
    layers = inject_lora(model, ["embed"], 4, 8.0)
    assert list(layers) == ["model.embed_tokens"] and lora_layers(model)
    assert tiny_config("llama").vocab_size == VOCAB
