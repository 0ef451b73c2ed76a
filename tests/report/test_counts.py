"""`describe`: what LoRA would train, from a config alone, checked against closed forms and transformers."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import GPT2_MEDIUM_SHAPE, GPT3_SHAPE, gpt2_closed_form, tiny_config, tiny_model

from lorafit.errors import LorafitError
from lorafit.recipe_file import validate
from lorafit.report.counts import describe as describe_recipe


def describe(model: str, *, dtype: str = "auto", **lora) -> dict:
    """describe() of a recipe with this model, dtype and [lora] keys."""
    return describe_recipe(validate({"model": {"name": model, "dtype": dtype}, "lora": lora}))

FP32, LORA_BYTES, ADAM_BYTES = 4, 4, 8


@pytest.fixture(scope="module")
def gpt3_r1(gpt3_dir):
    return describe(gpt3_dir, rank=1, alpha=2.0, targets=["q", "v"])


@pytest.fixture(scope="module")
def gpt3_r8(gpt3_dir):
    return describe(gpt3_dir, rank=8, alpha=16.0, targets=["q", "v"])


def test_closed_form_matches_transformers_count():
    """The closed form the big-shape tests use, checked once against transformers on a small config."""
    config = tiny_config("gpt2")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert model.num_parameters() == gpt2_closed_form(config)


def test_gpt3_shape_trainable_counts_match_the_paper(gpt3_r1, gpt3_r8):
    assert gpt3_r1["trainable_params"] == 4_718_592
    assert gpt3_r8["trainable_params"] == 37_748_736


def test_gpt3_shape_total_is_base_plus_lora(gpt3_r1):
    base = gpt2_closed_form(transformers.GPT2Config(**GPT3_SHAPE))
    assert gpt3_r1["total_params"] == base + gpt3_r1["trainable_params"]
    assert gpt3_r1["trainable_ratio"] == pytest.approx(gpt3_r1["trainable_params"] / gpt3_r1["total_params"])


def test_gpt3_shape_lists_one_fused_module_per_layer(gpt3_r8):
    d, rank = GPT3_SHAPE["n_embd"], 8
    modules = gpt3_r8["modules"]
    assert [row["name"] for row in modules] == [f"transformer.h.{i}.attn.c_attn" for i in range(96)]
    for row in modules:
        assert row["shape"] == [3 * d, d]
        assert row["lora_params"] == 2 * rank * (d + d)


def test_adapter_bytes_count_the_full_width_b(gpt3_r1):
    # Saved as PEFT sees it: A [2r, d] and B [3d, 2r] (k rows zero) per layer, fp32.
    d, rank = GPT3_SHAPE["n_embd"], 1
    assert gpt3_r1["adapter_bytes"] == 96 * (2 * rank * d + 3 * d * 2 * rank) * LORA_BYTES


def test_lora_memory_estimate_is_weights_grads_and_adam(gpt3_r8):
    trainable = gpt3_r8["trainable_params"]
    base = gpt3_r8["total_params"] - trainable
    lora = gpt3_r8["memory"]["lora_estimate"]
    assert lora["weights"] == base * FP32 + trainable * LORA_BYTES
    assert lora["gradients"] == trainable * LORA_BYTES
    assert lora["optimizer"] == trainable * ADAM_BYTES
    assert lora["total"] == base * FP32 + trainable * (LORA_BYTES + LORA_BYTES + ADAM_BYTES)


def test_full_finetune_estimate_counts_the_base_model_only(gpt3_r8):
    base = gpt2_closed_form(transformers.GPT2Config(**GPT3_SHAPE))
    full = gpt3_r8["memory"]["full_finetune_estimate"]
    assert full["weights"] == base * FP32
    assert full["gradients"] == base * FP32
    assert full["optimizer"] == base * ADAM_BYTES
    assert full["total"] == base * (FP32 + FP32 + ADAM_BYTES)


def test_half_precision_base_halves_the_frozen_weights(tmp_path):
    transformers.GPT2Config(**GPT2_MEDIUM_SHAPE).save_pretrained(tmp_path)
    report = describe(str(tmp_path), rank=4, alpha=8.0, targets=["q", "v"], dtype="bfloat16")
    trainable = report["trainable_params"]
    base = report["total_params"] - trainable
    assert report["memory"]["lora_estimate"]["weights"] == base * 2 + trainable * LORA_BYTES


def test_gpt2_medium_rank4_qv(tmp_path):
    transformers.GPT2Config(**GPT2_MEDIUM_SHAPE).save_pretrained(tmp_path)
    report = describe(str(tmp_path), rank=4, alpha=8.0, targets=["q", "v"])
    assert report["trainable_params"] == 393_216
    assert report["total_params"] == gpt2_closed_form(transformers.GPT2Config(**GPT2_MEDIUM_SHAPE)) + 393_216


def test_describe_reads_only_the_config(tmp_path):
    """The folder holds config.json and nothing else, so no weights can have been read."""
    tiny_config("gpt2").save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    report = describe(str(tmp_path), rank=2, alpha=4.0, targets=["q", "v", "down"])
    assert report["model_type"] == "gpt2"
    assert report["lora"] == {"rank": 2, "alpha": 4.0, "targets": ["q", "v", "down"], "variant": "lora"}


def test_describe_missing_folder_is_a_lorafit_error(tmp_path):
    with pytest.raises(LorafitError, match="does not exist"):
        describe(str(tmp_path / "missing"), rank=8, alpha=16.0, targets=["q", "v"])


# ---------------------------------------------------------------- every variant, counted as the registry says

RANK_SAVED = 3


def _trained(layers: dict) -> dict:
    """Non-zero updates everywhere, and some AdaLoRA triplets pruned, as after training."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in layers.values():
            for parameter in layer.parameters():
                if parameter.requires_grad:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator))
            if hasattr(layer, "lora_E"):
                layer.lora_E[::3] = 0
    return layers


@pytest.mark.parametrize(
    ("arch", "targets", "lora"),
    [
        ("gpt2", ["q", "v", "down"], {"variant": "dora"}),  # fused c_attn: the magnitude covers k's rows too
        ("llama", ["q", "v", "down"], {"variant": "dora"}),
        ("gpt2", ["q", "v"], {"init": "pissa"}),  # saved against the original base: rank 2r per slice
        ("llama", ["embed", "q"], {}),
        ("gpt2", ["q", "v"], {"variant": "adalora", "adalora": {"init_rank": 4, "target_rank": 2}}),
    ],
    ids=["dora-gpt2", "dora-llama", "pissa-gpt2", "embedding-llama", "adalora-gpt2"],
)
def test_adapter_bytes_are_the_bytes_of_the_tensors_saved(arch, targets, lora):
    from lorafit.adapter.save import adapter_tensors
    from lorafit.model.inject import wrap_targets
    from lorafit.report.counts import adapter_tensor_bytes

    settings = validate({"lora": {"rank": RANK_SAVED, "targets": targets, **lora}}).lora
    layers = _trained(wrap_targets(tiny_model(arch), settings))
    saved = adapter_tensors(layers)
    assert adapter_tensor_bytes(layers) == sum(tensor.numel() * tensor.element_size() for tensor in saved.values())


def test_dry_run_and_info_count_a_dora_recipe_alike(tmp_path):
    """The shipped tiny model and recipe with DoRA: both count A, B and one magnitude per adapted row."""
    import json

    from conftest import REPO, TINY_MODEL
    from typer.testing import CliRunner

    from lorafit.cli import app

    recipe = str(REPO / "recipes" / "tiny-sst2.toml")
    options = ["--set", "lora.variant=dora", "--set", f"output.dir={tmp_path / 'run'}"]
    runner = CliRunner()
    dry = runner.invoke(app, ["train", "--recipe", recipe, *options, "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.stdout)["model"]
    info = runner.invoke(app, ["info", "--recipe", recipe, "--variant", "dora", "--json"])
    assert info.exit_code == 0, info.output
    described = json.loads(info.stdout)

    config = transformers.AutoConfig.from_pretrained(TINY_MODEL)
    d, rank = config.n_embd, 8
    # per block, c_attn's q and v slices: A [2r, d], B [2d, r] stacked, and a magnitude for each of the 2d rows
    expected = config.n_layer * (2 * rank * d + 2 * d * rank + 2 * d)
    assert planned["trainable_params"] == described["trainable_params"] == expected
    assert planned["lora"]["variant"] == described["lora"]["variant"] == "dora"
    assert planned["adapter_bytes"] == described["adapter_bytes"]
