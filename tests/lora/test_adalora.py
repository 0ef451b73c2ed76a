"""AdaLoRA: the rank budget follows the paper's cubic schedule step by step, and the exported plain LoRA with
per-module ranks gives lorafit's own logits, loaded by lorafit and by peft (rank_pattern)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line_error, assert_same, logits, supervised_rows, tiny_model
from torch.optim.lr_scheduler import LambdaLR

from lorafit.adapter.convert import peft_tensors
from lorafit.adapter.load import load_adapter
from lorafit.adapter.save import save_adapter
from lorafit.data.batches import collate
from lorafit.errors import LorafitError
from lorafit.lora.adalora import AdaLoRALinear, rank_allocator
from lorafit.recipe import LoraSection
from lorafit.recipe_file import load_recipe, recipe_toml, validate
from lorafit.train.step import prepare_model, train_step

peft = pytest.importorskip("peft")
TOTAL, TINIT, TFINAL = 10, 2, 3
LORA = LoraSection(variant="adalora", init_rank=6, target_rank=2, tinit=TINIT, tfinal=TFINAL, delta_t=1, alpha=8,
                   dropout=0.0, targets=["q", "v", "down"])


def expected_budget(step: int, initial: int, target: int) -> int:
    """Zhang et al. 2023, eq. (10): b(t) = b_T + (b_0 - b_T)(1 - (t - t_i)/(T - t_i - t_f))^3 between the phases."""
    if step <= TINIT:
        return initial
    if step > TOTAL - TFINAL:
        return target
    return int(target + (initial - target) * (1 - (step - TINIT) / (TOTAL - TINIT - TFINAL)) ** 3)


def trained_adalora(arch: str = "gpt2") -> tuple[torch.nn.Module, dict, list[int]]:
    """A tiny model trained TOTAL steps with AdaLoRA; returns it, its layers and the kept triplets after each step."""
    from accelerate import Accelerator

    from lorafit.model.loss import SupervisedLoss

    model = tiny_model(arch)
    layers = prepare_model(model, LORA)
    ranks = rank_allocator(layers, LORA, TOTAL)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    accelerator = Accelerator(cpu=True)
    scorer, optimizer = accelerator.prepare(SupervisedLoss(model), optimizer)
    scheduler = LambdaLR(optimizer, lambda step: 1.0)
    batch = collate(supervised_rows(), pad_id=1)
    scorer.train()
    kept = []
    for step in range(TOTAL):
        train_step(accelerator, scorer, optimizer, scheduler, [batch], step=step, max_grad_norm=1.0, ranks=ranks)
        kept.append(sum(int((layer.lora_E != 0).sum()) for layer in layers.values()))
    return model.eval(), layers, kept


def test_rank_budget_follows_the_cubic_schedule_every_step():
    _, layers, kept = trained_adalora()
    slices = sum(len(layer.slice_sizes) for layer in layers.values())  # q and v of c_attn, mlp.c_proj: 3 a block
    assert slices == 6
    expected = [expected_budget(step, slices * 6, slices * 2) for step in range(1, TOTAL + 1)]
    assert kept == expected
    assert expected[0] > expected[TINIT + 1] > expected[-1]  # the schedule really prunes


def test_exported_adapter_has_per_module_ranks_and_lorafits_logits_in_lorafit_and_peft(tmp_path, tokens):
    model, layers, _ = trained_adalora()
    expected = logits(model, tokens)
    save_adapter(model, tmp_path, base_model="tiny", targets=LORA.targets)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    ranks = {path: max(int((layer.lora_E != 0).sum()), 1) for path, layer in layers.items()}
    assert len(set(ranks.values())) > 1 and config["rank_pattern"]  # ranks differ, so peft needs the pattern

    ours = tiny_model("gpt2")
    loaded = load_adapter(ours, tmp_path)
    assert {path: layer.lora_A.shape[0] for path, layer in loaded.items()} == ranks
    assert_same(logits(ours, tokens), expected)
    theirs = peft.PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path).eval()
    assert_same(logits(theirs, tokens), expected)


def test_adalora_layer_is_base_plus_scaled_p_lambda_q(tokens):
    layer = AdaLoRALinear(torch.nn.Linear(16, 8), 4, 8.0)
    with torch.no_grad():
        layer.lora_E.copy_(torch.tensor([0.5, 0.0, -1.0, 2.0]))
    x = torch.randn(3, 16)
    dense = layer.base.weight + (8.0 / 4) * layer.lora_B @ torch.diag(layer.lora_E) @ layer.lora_A
    torch.testing.assert_close(layer(x), x @ dense.t() + layer.base.bias)
    a, b = peft_tensors(layer)["A"], peft_tensors(layer)["B"]
    assert a.shape == (3, 16) and b.shape == (8, 3)  # the pruned triplet is not exported


@pytest.mark.parametrize(
    "lora, message",
    [
        ({"variant": "adalora", "init_rank": 4, "target_rank": 8}, "target_rank = 8 is above init_rank = 4"),
        ({"variant": "adalora", "init": "pissa"}, "init = 'pissa' is defined for variant = 'lora' only"),
    ],
)
def test_undefined_adalora_combinations_are_refused(tiny_recipe, lora, message):
    with pytest.raises(LorafitError, match=message):
        load_recipe(tiny_recipe(lora=lora))


def test_schedule_without_steps_to_prune_is_refused():
    layers = prepare_model(tiny_model("gpt2"), LORA)
    with pytest.raises(LorafitError, match="tinit \\+ tfinal"):
        rank_allocator(layers, LORA, TINIT + TFINAL)


def test_adalora_with_fp16_loss_scaling_is_refused():
    with pytest.raises(LorafitError, match="variant = 'adalora' with fp16 loss scaling is not supported"):
        validate({"lora": {"variant": "adalora"}, "train": {"mixed_precision": "fp16"}})


# ---------------------------------------------------------------- [lora.adalora]: AdaLoRA's own keys


def test_flat_adalora_keys_of_older_recipes_are_read_into_the_sub_table(tmp_path):
    flat = tmp_path / "flat.toml"
    flat.write_text('[lora]\nvariant = "adalora"\ninit_rank = 16\ntinit = 3\n')
    nested = tmp_path / "nested.toml"
    nested.write_text('[lora]\nvariant = "adalora"\n\n[lora.adalora]\ninit_rank = 16\ntinit = 3\n')
    assert load_recipe(flat) == load_recipe(nested)
    keys = load_recipe(flat).lora.adalora
    assert (keys.init_rank, keys.tinit, keys.target_rank) == (16, 3, 8)
    assert "[lora.adalora]\ninit_rank = 16\n" in recipe_toml(load_recipe(flat))


def test_a_plain_lora_recipe_carries_no_adalora_sub_table():
    """Not in its resolved recipe; and the AdaLoRA keys an older plain run's recipe.toml holds change nothing,
    so such a run still resumes with its own recipe."""
    plain = validate({"lora": {"variant": "lora"}})
    assert plain.lora.adalora is None and "adalora" not in recipe_toml(plain)
    older = validate({"lora": {"variant": "lora", "init_rank": 12, "target_rank": 8, "tinit": 0, "orth_reg_weight": 0.5}})
    assert older == plain


def test_set_reaches_a_sub_table_key_and_a_flat_key_overrides_it(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[lora]\nvariant = "adalora"\n\n[lora.adalora]\ninit_rank = 6\ntarget_rank = 3\n')
    nested = load_recipe(path, ["lora.adalora.init_rank=10"]).lora.adalora
    assert (nested.init_rank, nested.target_rank) == (10, 3)
    flat = load_recipe(path, ["lora.init_rank=4"]).lora.adalora
    assert (flat.init_rank, flat.target_rank) == (4, 3)


def test_resume_of_an_adalora_run_is_refused_in_one_line(tiny_recipe):
    from typer.testing import CliRunner

    from lorafit.cli import app

    adalora = {"variant": "adalora", "adalora": {"init_rank": 2, "target_rank": 1}}
    recipe = tiny_recipe(lora=adalora, train={"max_steps": 2, "save_every": 1, "log_every": 1},
                         data={"max_eval_examples": 2})
    runner = CliRunner()
    assert runner.invoke(app, ["train", "-r", str(recipe)]).exit_code == 0
    (recipe.parent / "run" / "report.json").unlink()  # as if stopped during the final evaluation
    line = assert_one_line_error(runner.invoke(app, ["train", "-r", str(recipe), "--resume"]))
    assert "AdaLoRA runs cannot be resumed yet" in line and line.endswith("give --output for a new run"), line
