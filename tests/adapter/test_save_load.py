"""lorafit's own adapter round trip: fused slices rebuilt on load, lorafit.json, and writes that are all or nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import RANK, adapted, assert_same, logits, peft_logits, randomize, saved_adapter, snapshot, tiny_model
from safetensors.torch import load_file, save_file

from lorafit.adapter.format import selecting_suffixes
from lorafit.adapter.load import load_adapter
from lorafit.adapter.save import save_adapter
from lorafit.errors import LorafitError
from lorafit.model.inject import inject_lora

pytest.importorskip("peft")

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "lorafit.json"}


def test_lorafit_json_records_targets_slices_and_extra(tmp_path):
    model, _ = adapted("gpt2", ["q", "v", "o"])
    save_adapter(model, tmp_path, base_model="tiny", targets=["q", "v", "o"], extra={"recipe": {"lora": {"rank": 4}}})

    facts = json.loads((tmp_path / "lorafit.json").read_text())
    assert facts["targets"] == ["q", "v", "o"]
    assert facts["extra"] == {"recipe": {"lora": {"rank": 4}}}
    fused = facts["modules"]["transformer.h.0.attn.c_attn"]
    assert (fused["rank"], fused["slices"], fused["targets"]) == (RANK, [32, 32], ["q", "v"])
    assert facts["modules"]["transformer.h.0.attn.c_proj"]["slices"] is None


def test_target_suffixes_are_the_shortest_unambiguous_ones():
    model, layers = adapted("gpt2", ["q", "v", "o", "down"])
    suffixes = selecting_suffixes((path for path, _ in model.named_modules()), list(layers))
    # c_proj alone is fine once both attn.c_proj and mlp.c_proj are wrapped.
    assert set(suffixes.values()) == {"c_attn", "c_proj"}


# ---------------------------------------------------------------- lorafit -> lorafit


def test_load_adapter_rebuilds_q_v_slices_so_k_features_stay_frozen(tmp_path, tokens):
    saved_adapter("gpt2", tmp_path)

    reloaded = tiny_model("gpt2")
    layers = load_adapter(reloaded, tmp_path)
    layer = layers["transformer.h.0.attn.c_attn"]
    assert layer.slice_sizes == [32, 32] and layer.lora_B.shape == (64, RANK)
    assert all(not p.requires_grad for n, p in reloaded.named_parameters() if "lora_" not in n)
    assert all(layer.lora_A.requires_grad and layer.lora_B.requires_grad for layer in layers.values())
    assert_same(logits(reloaded, tokens), peft_logits("gpt2", tmp_path, tokens))


def test_adapter_without_lorafit_json_loads_as_one_plain_lora(tmp_path, tokens):
    saved_adapter("gpt2", tmp_path)
    (tmp_path / "lorafit.json").unlink()

    reloaded = tiny_model("gpt2")
    layer = load_adapter(reloaded, tmp_path)["transformer.h.0.attn.c_attn"]
    assert layer.slices is None and layer.lora_A.shape == (2 * RANK, 32)
    assert_same(logits(reloaded, tokens), peft_logits("gpt2", tmp_path, tokens))


def test_adapter_with_trained_k_features_loads_as_plain_lora(tmp_path, tokens):
    """An adapter trained further by peft (k features no longer zero) cannot be sliced; it still loads exactly."""
    saved_adapter("gpt2", tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    for key in weights:
        if key.endswith("lora_B.weight"):
            weights[key][32:64] = 0.05
    save_file(weights, tmp_path / "adapter_model.safetensors")

    reloaded = tiny_model("gpt2")
    assert load_adapter(reloaded, tmp_path)["transformer.h.0.attn.c_attn"].slices is None
    assert_same(logits(reloaded, tokens), peft_logits("gpt2", tmp_path, tokens))


def test_load_adapter_leaves_the_global_rng_alone(tmp_path):
    saved_adapter("llama", tmp_path)
    fresh = tiny_model("llama")
    torch.manual_seed(5)
    load_adapter(fresh, tmp_path)
    after_load = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after_load)


# ---------------------------------------------------------------- atomic writes


def test_save_adapter_leaves_only_the_adapter_files(tmp_path):
    model, _ = adapted("gpt2", ["q", "v"])
    written = save_adapter(model, tmp_path / "runs" / "adapter", base_model="tiny", targets=["q", "v"])

    assert {p.name for p in (tmp_path / "runs").iterdir()} == {"adapter"}
    assert {p.name for p in (tmp_path / "runs" / "adapter").iterdir()} == ADAPTER_FILES
    assert written == (tmp_path / "runs" / "adapter" / "adapter_model.safetensors").stat().st_size


def test_resaving_over_an_adapter_replaces_it_fully(tmp_path, tokens):
    saved_adapter("gpt2", tmp_path)
    second = tiny_model("gpt2")
    randomize(inject_lora(second, ["o"], 2, 3), seed=7)
    save_adapter(second, tmp_path, base_model="tiny", targets=["o"])

    assert {p.name for p in tmp_path.iterdir()} == ADAPTER_FILES
    assert json.loads((tmp_path / "lorafit.json").read_text())["targets"] == ["o"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["attn.c_proj"]
    assert_same(peft_logits("gpt2", tmp_path, tokens), logits(second, tokens))


@pytest.mark.parametrize("existing", [True, False], ids=["over-old-adapter", "new-folder"])
def test_failed_save_leaves_no_trace(existing, tmp_path, monkeypatch):
    directory = tmp_path / "adapter"
    if existing:
        saved_adapter("gpt2", directory)
    before = snapshot(tmp_path)

    real_write_bytes = Path.write_bytes

    def disk_full_at_the_last_file(path: Path, data: bytes) -> int:
        if "lorafit.json" in path.name:
            real_write_bytes(path, data[:10])
            raise OSError("disk full")
        return real_write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full_at_the_last_file)
    model, _ = adapted("gpt2", ["q", "v"])
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, directory, base_model="tiny", targets=["q", "v"])
    assert snapshot(tmp_path) == before


def test_save_adapter_refuses_a_model_without_lora(tmp_path):
    with pytest.raises(LorafitError, match="no LoRA layers"):
        save_adapter(tiny_model("gpt2"), tmp_path / "adapter", base_model="tiny", targets=["q"])
    assert not (tmp_path / "adapter").exists()
