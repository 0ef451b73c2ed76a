"""Adapters in the PEFT format: peft loads ours with the same logits, and lorafit loads peft's."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from conftest import LLAMA_SHAPE, SMALL, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorafit.adapter import load_adapter, read_adapter_config, save_adapter
from lorafit.errors import LorafitError
from lorafit.inject import inject_lora, lora_layers
from lorafit.lora import LoRALinear
from lorafit.peft_format import selecting_suffixes

peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 8
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "lorafit.json"}
# What peft users write for q and v on each architecture.
PEFT_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"]}


def randomize(layers: dict[str, LoRALinear], seed: int = 1) -> None:
    """Non-zero A and B, so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator))
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=generator))


def adapted(arch: str, targets: list[str], **options) -> tuple[torch.nn.Module, dict[str, LoRALinear]]:
    model = tiny_model(arch)
    layers = inject_lora(model, targets, RANK, ALPHA, **options)
    randomize(layers)
    return model, layers


@torch.no_grad()
def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits


def peft_logits(arch: str, directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    return logits(peft.PeftModel.from_pretrained(tiny_model(arch), directory).eval(), tokens)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def assert_changed(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() > 1e-2


def peft_written(arch: str, directory: Path, **options) -> torch.nn.Module:
    """An adapter saved by peft itself, with a non-zero B (init_lora_weights=False draws both A and B)."""
    settings = {"r": RANK, "lora_alpha": ALPHA, "target_modules": PEFT_TARGETS[arch], "fan_in_fan_out": arch == "gpt2"}
    settings.update(options)
    config = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **settings)
    torch.manual_seed(3)
    model = peft.get_peft_model(tiny_model(arch), config).eval()
    model.save_pretrained(directory)
    return model


def config_of(directory: Path) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


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

    config = config_of(tmp_path)
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

    config = config_of(tmp_path)
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

    config = config_of(tmp_path)
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


def test_lorafit_json_records_targets_slices_and_extra(tmp_path):
    model, _ = adapted("gpt2", ["q", "v", "o"])
    save_adapter(model, tmp_path, base_model="tiny", targets=["q", "v", "o"], extra={"recipe": {"lora": {"rank": 4}}})

    facts = json.loads((tmp_path / "lorafit.json").read_text())
    assert facts["targets"] == ["q", "v", "o"]
    assert facts["extra"] == {"recipe": {"lora": {"rank": 4}}}
    fused = facts["modules"]["transformer.h.0.attn.c_attn"]
    assert (fused["rank"], fused["slices"], fused["targets"]) == (RANK, [32, 32], ["q", "v"])
    assert facts["modules"]["transformer.h.0.attn.c_proj"]["slices"] is None


# ---------------------------------------------------------------- lorafit -> lorafit


def test_load_adapter_rebuilds_q_v_slices_so_k_features_stay_frozen(tmp_path, tokens):
    model, _ = adapted("gpt2", ["q", "v"])
    save_adapter(model, tmp_path, base_model="tiny", targets=["q", "v"])

    reloaded = tiny_model("gpt2")
    layers = load_adapter(reloaded, tmp_path)
    layer = layers["transformer.h.0.attn.c_attn"]
    assert layer.slice_sizes == [32, 32] and layer.lora_B.shape == (64, RANK)
    assert all(not p.requires_grad for n, p in reloaded.named_parameters() if "lora_" not in n)
    assert all(layer.lora_A.requires_grad and layer.lora_B.requires_grad for layer in layers.values())
    assert_same(logits(reloaded, tokens), peft_logits("gpt2", tmp_path, tokens))


def test_adapter_without_lorafit_json_loads_as_one_plain_lora(tmp_path, tokens):
    model, _ = adapted("gpt2", ["q", "v"])
    save_adapter(model, tmp_path, base_model="tiny", targets=["q", "v"])
    (tmp_path / "lorafit.json").unlink()

    reloaded = tiny_model("gpt2")
    layer = load_adapter(reloaded, tmp_path)["transformer.h.0.attn.c_attn"]
    assert layer.slices is None and layer.lora_A.shape == (2 * RANK, 32)
    assert_same(logits(reloaded, tokens), peft_logits("gpt2", tmp_path, tokens))


def test_adapter_with_trained_k_features_loads_as_plain_lora(tmp_path, tokens):
    """An adapter trained further by peft (k features no longer zero) cannot be sliced; it still loads exactly."""
    model, _ = adapted("gpt2", ["q", "v"])
    save_adapter(model, tmp_path, base_model="tiny", targets=["q", "v"])
    weights = load_file(tmp_path / "adapter_model.safetensors")
    for key in weights:
        if key.endswith("lora_B.weight"):
            weights[key][32:64] = 0.05
    save_file(weights, tmp_path / "adapter_model.safetensors")

    reloaded = tiny_model("gpt2")
    assert load_adapter(reloaded, tmp_path)["transformer.h.0.attn.c_attn"].slices is None
    assert_same(logits(reloaded, tokens), peft_logits("gpt2", tmp_path, tokens))


def test_load_adapter_leaves_the_global_rng_alone(tmp_path):
    model, _ = adapted("llama", ["q", "v"])
    save_adapter(model, tmp_path, base_model="tiny", targets=["q", "v"])
    fresh = tiny_model("llama")
    torch.manual_seed(5)
    load_adapter(fresh, tmp_path)
    after_load = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after_load)


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
    assert config_of(tmp_path / "again")["alpha_pattern"] == {r"model\.layers\.1\.self_attn\.q_proj": 3}
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


# ---------------------------------------------------------------- refusals


def good_adapter(directory: Path, arch: str = "gpt2") -> Path:
    model, _ = adapted(arch, ["q", "v"])
    save_adapter(model, directory, base_model="tiny", targets=["q", "v"])
    return directory


def edit_config(directory: Path, **changes) -> Path:
    config = {**config_of(directory), **changes}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def edit_weights(directory: Path, change) -> Path:
    weights = load_file(directory / "adapter_model.safetensors")
    change(weights)
    save_file(weights, directory / "adapter_model.safetensors")
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
        "not a LoRA A or B",
    ),
    "missing-B": (lambda d: edit_weights(good_adapter(d), lambda w: w.pop(LAST_B)), "no lora_B"),
    "wrong-rank": (lambda d: edit_config(good_adapter(d), r=3), "rank"),
    "last-module-too-wide": (
        lambda d: edit_weights(good_adapter(d), lambda w: w.update({LAST_A: torch.ones(8, 64)})),
        "adapter for d_in=64 but base has 32",
    ),
    "not-selected": (lambda d: edit_config(good_adapter(d), target_modules=["c_proj"]), "does not select"),
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


def test_read_adapter_config_accepts_what_peft_wrote(tmp_path):
    peft_written("llama", tmp_path)
    config = read_adapter_config(tmp_path)
    assert config["peft_type"] == "LORA" and config["r"] == RANK


# ---------------------------------------------------------------- atomic writes


def test_save_adapter_leaves_only_the_adapter_files(tmp_path):
    model, _ = adapted("gpt2", ["q", "v"])
    written = save_adapter(model, tmp_path / "runs" / "adapter", base_model="tiny", targets=["q", "v"])

    assert {p.name for p in (tmp_path / "runs").iterdir()} == {"adapter"}
    assert {p.name for p in (tmp_path / "runs" / "adapter").iterdir()} == ADAPTER_FILES
    assert written == (tmp_path / "runs" / "adapter" / "adapter_model.safetensors").stat().st_size


def test_resaving_over_an_adapter_replaces_it_fully(tmp_path, tokens):
    first, _ = adapted("gpt2", ["q", "v"])
    save_adapter(first, tmp_path, base_model="tiny", targets=["q", "v"])
    second = tiny_model("gpt2")
    randomize(inject_lora(second, ["o"], 2, 3), seed=7)
    save_adapter(second, tmp_path, base_model="tiny", targets=["o"])

    assert {p.name for p in tmp_path.iterdir()} == ADAPTER_FILES
    assert json.loads((tmp_path / "lorafit.json").read_text())["targets"] == ["o"]
    assert config_of(tmp_path)["target_modules"] == ["attn.c_proj"]
    assert_same(peft_logits("gpt2", tmp_path, tokens), logits(second, tokens))


@pytest.mark.parametrize("existing", [True, False], ids=["over-old-adapter", "new-folder"])
def test_failed_save_leaves_no_trace(existing, tmp_path, monkeypatch):
    directory = tmp_path / "adapter"
    if existing:
        good_adapter(directory)
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


def test_target_suffixes_are_the_shortest_unambiguous_ones():
    model, layers = adapted("gpt2", ["q", "v", "o", "down"])
    suffixes = selecting_suffixes((path for path, _ in model.named_modules()), list(layers))
    # c_proj alone is fine once both attn.c_proj and mlp.c_proj are wrapped.
    assert set(suffixes.values()) == {"c_attn", "c_proj"}
