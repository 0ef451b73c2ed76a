"""Bad adapters are refused with one line before the model changes: wrong kind, wrong shape, pickles, foreign bases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import LLAMA_SHAPE, SMALL, adapter_config, saved_adapter, tiny_model
from safetensors.torch import load_file, save_file

from lorafit.adapter.load import load_adapter
from lorafit.errors import LorafitError
from lorafit.model.inject import lora_layers


def good_adapter(directory: Path, arch: str = "gpt2") -> Path:
    saved_adapter(arch, directory)
    return directory


def edit_config(directory: Path, **changes) -> Path:
    config = {**adapter_config(directory), **changes}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def edit_weights(directory: Path, change) -> Path:
    weights = load_file(directory / "adapter_model.safetensors")
    change(weights)
    save_file(weights, directory / "adapter_model.safetensors")
    return directory


def config_with_a_key_twice(directory: Path) -> Path:
    """adapter_config.json whose "r" is given twice: json keeps the last value, other readers the first."""
    good_adapter(directory)
    text = (directory / "adapter_config.json").read_text()
    (directory / "adapter_config.json").write_text(text.replace('"r":', '"r": 2, "r":', 1))
    return directory


def only_pickle(directory: Path) -> Path:
    good_adapter(directory)
    (directory / "adapter_model.safetensors").unlink()
    (directory / "adapter_model.bin").write_bytes(b"not to be unpickled")
    return directory


LAST_A = "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"
LAST_B = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
REFUSALS = {
    "missing": (lambda d: d / "nowhere", "does not exist"),
    "no-config": (lambda d: d, "is not an adapter directory (no adapter_config.json)"),
    "not-lora": (lambda d: edit_config(good_adapter(d), peft_type="IA3"), "LoRA adapters only"),
    "dora": (lambda d: edit_config(good_adapter(d), use_dora=True), "use_dora"),
    "bias": (lambda d: edit_config(good_adapter(d), bias="all"), "bias"),
    "pickle-only": (only_pickle, "convert it to adapter_model.safetensors"),
    "magnitude": (
        lambda d: edit_weights(good_adapter(d), lambda w: w.update({LAST_A.removesuffix("lora_A.weight") + "lora_magnitude_vector": torch.ones(96)})),
        "has a lora_magnitude_vector but the adapter config says use_dora=False",
    ),
    "missing-B": (lambda d: edit_weights(good_adapter(d), lambda w: w.pop(LAST_B)), "no lora_B"),
    "wrong-rank": (lambda d: edit_config(good_adapter(d), r=3), "rank"),
    "last-module-too-wide": (
        lambda d: edit_weights(good_adapter(d), lambda w: w.update({LAST_A: torch.ones(8, 64)})),
        "adapter for d_in=64 but base has 32",
    ),
    "not-selected": (lambda d: edit_config(good_adapter(d), target_modules=["c_proj"]), "does not select"),
    "key-twice": (config_with_a_key_twice, "is not valid JSON (key 'r' is given twice)"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_adapters_are_refused_before_the_model_changes(case, tmp_path):
    make, message = REFUSALS[case]
    directory = make(tmp_path)
    model = tiny_model("gpt2")
    before = {name: p.clone() for name, p in model.state_dict().items()}

    with pytest.raises(LorafitError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        load_adapter(model, directory)

    assert "\n" not in str(error.value)
    assert not lora_layers(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())


def test_adapter_for_another_architecture_is_refused(tmp_path):
    good_adapter(tmp_path, "gpt2")
    with pytest.raises(LorafitError, match="transformer.h.0.attn.c_attn which this llama model does not have"):
        load_adapter(tiny_model("llama"), tmp_path)


def test_adapter_for_another_size_is_refused(tmp_path):
    good_adapter(tmp_path, "llama")
    config = transformers.LlamaConfig(**{**LLAMA_SHAPE, "hidden_size": 64}, **SMALL)
    wider = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(LorafitError, match="adapter for d_in=32 but base has 64"):
        load_adapter(wider, tmp_path)
    assert not lora_layers(wider)
