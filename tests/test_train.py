"""The training loop: the run folder it writes, what it trains, its schedule, accumulation and batching."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import REPO, TINY_DATA, TINY_MODEL, tiny_model, write_recipe
from rich.console import Console
from safetensors.torch import load_file
from torch.optim.lr_scheduler import LambdaLR
from typer.testing import CliRunner

import lorafit.train as train_module
from lorafit.adapter import load_adapter
from lorafit.batches import StepRows, collate
from lorafit.cli import app
from lorafit.data import IGNORE
from lorafit.errors import LorafitError
from lorafit.inject import inject_lora, lora_layers
from lorafit.loss import SupervisedLoss, loss_sum
from lorafit.recipe import LoraSection, load_recipe
from lorafit.rows import load_rows
from lorafit.train import lr_factor, optimizer_step, prepare_model, train

RANK = 4
STEPS = 6
LOG_EVERY = 4
SAVE_EVERY = 4
WARMUP = 2
LR = 1e-3
REPORT_KEYS = {
    "total_params",
    "trainable_params",
    "trainable_ratio",
    "adapter_bytes",
    "modules",
    "memory",
    "throughput",
    "eval",
    "device",
}
runner = CliRunner()


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and modification time, to prove nothing changed."""
    return {
        str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's own tensors, under the names a plain transformers model gives them."""
    return {
        name.replace(".base.", "."): tensor
        for name, tensor in model.state_dict().items()
        if ".lora_A" not in name and ".lora_B" not in name
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run on the shipped tiny model; the trained model and A at injection time are kept for inspection."""
    folder = tmp_path_factory.mktemp("trained")
    path = write_recipe(
        folder,
        train={"max_steps": STEPS, "log_every": LOG_EVERY, "save_every": SAVE_EVERY, "warmup_steps": WARMUP, "lr": LR},
    )
    recipe = load_recipe(path)
    captured = {}

    def recording_inject(model, *args, **kwargs):
        layers = inject_lora(model, *args, **kwargs)
        captured["model"] = model
        captured["initial_A"] = {name: layer.lora_A.detach().clone() for name, layer in layers.items()}
        return layers

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "inject_lora", recording_inject)
        report = train(recipe, console=quiet())
    return {"recipe": recipe, "run": Path(recipe.output.dir), "report": report, "recipe_path": path, **captured}


@pytest.fixture(scope="module")
def tiny_shape() -> transformers.GPT2Config:
    return transformers.AutoConfig.from_pretrained(TINY_MODEL)


# ---------------------------------------------------------------- (1) the run folder


def test_run_folder_holds_exactly_the_documented_entries(trained):
    run = trained["run"]
    assert {p.name for p in run.iterdir()} == {"adapter", "checkpoints", "recipe.toml", "metrics.jsonl", "report.json"}
    assert {p.name for p in (run / "adapter").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorafit.json",
    }


def test_checkpoints_are_saved_every_save_every_steps_before_the_last(trained):
    checkpoints = sorted(p.name for p in (trained["run"] / "checkpoints").iterdir())
    expected = [f"step-{step:06d}" for step in range(SAVE_EVERY, STEPS, SAVE_EVERY)]
    assert checkpoints == expected
    assert (trained["run"] / "checkpoints" / expected[0] / "adapter" / "adapter_model.safetensors").is_file()


def test_no_temporary_files_are_left_in_the_run_folder(trained):
    leftovers = [p for p in trained["run"].rglob("*") if p.name.startswith(".") or p.name.endswith((".tmp", ".old"))]
    assert leftovers == []


def test_saved_recipe_loads_back_to_the_run_recipe(trained):
    assert load_recipe(trained["run"] / "recipe.toml") == trained["recipe"]


def test_metrics_has_one_line_per_log_step_and_the_last(trained):
    lines = (trained["run"] / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    expected_steps = sorted({*range(LOG_EVERY, STEPS + 1, LOG_EVERY), STEPS})
    assert [r["step"] for r in records] == expected_steps
    for record in records:
        assert set(record) == {"step", "loss", "lr", "tokens_per_s"}
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert record["tokens_per_s"] > 0


def test_metrics_lr_follows_the_schedule(trained):
    # The logged lr is the one the scheduler holds after `step` updates, i.e. for the next update.
    records = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        expected = LR * lr_factor(record["step"], warmup=WARMUP, total=STEPS, schedule="linear")
        assert record["lr"] == pytest.approx(expected, abs=1e-12)


def test_report_json_is_the_returned_report_with_every_documented_key(trained):
    on_disk = json.loads((trained["run"] / "report.json").read_text())
    assert REPORT_KEYS <= set(on_disk)
    assert on_disk == json.loads(json.dumps(trained["report"], default=str))


def test_report_counts_match_the_model_config(trained, tiny_shape):
    report = trained["report"]
    d, layers = tiny_shape.n_embd, tiny_shape.n_layer
    base = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    base_params = sum(p.numel() for p in base.parameters())
    # q and v each get A [r, d] and B [d, r]: 4·r·d per layer.
    lora_params = layers * 4 * RANK * d
    assert report["trainable_params"] == lora_params
    assert report["total_params"] == base_params + lora_params
    assert report["trainable_ratio"] == pytest.approx(lora_params / (base_params + lora_params))
    assert report["modules"] == [
        {"name": f"transformer.h.{i}.attn.c_attn", "shape": [3 * d, d], "lora_params": 4 * RANK * d}
        for i in range(layers)
    ]


def test_report_adapter_bytes_is_the_file_size(trained):
    size = os.path.getsize(trained["run"] / "adapter" / "adapter_model.safetensors")
    assert trained["report"]["adapter_bytes"] == size


def test_report_memory_throughput_eval_and_device(trained):
    report = trained["report"]
    memory = report["memory"]
    assert memory["peak_bytes"] > 0 and isinstance(memory["peak_kind"], str)
    for key in ("lora_estimate", "full_finetune_estimate"):
        assert memory[key]["total"] == sum(memory[key][part] for part in ("weights", "gradients", "optimizer"))
    assert memory["lora_estimate"]["total"] < memory["full_finetune_estimate"]["total"]
    throughput = report["throughput"]
    assert throughput["steps"] == STEPS
    assert throughput["tokens_per_s"] > 0 and throughput["wall_s"] > 0
    evaluation = report["eval"]
    assert evaluation["examples"] == 16
    assert evaluation["perplexity"] == pytest.approx(math.exp(evaluation["loss"]))
    assert 0.0 <= evaluation["accuracy"] <= 1.0
    assert isinstance(report["device"], str) and report["device"]


# ---------------------------------------------------------------- (2) only A and B change


def test_training_leaves_every_base_tensor_bit_identical(trained):
    fresh = base_state(transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL))
    after = base_state(trained["model"])
    assert set(after) == set(fresh)
    changed = [name for name in fresh if not torch.equal(fresh[name], after[name])]
    assert changed == []


def test_only_lora_parameters_are_trainable(trained):
    trainable = {name for name, p in trained["model"].named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith((".lora_A", ".lora_B")) for name in trainable)


def test_training_moves_every_A_and_B(trained):
    for name, layer in lora_layers(trained["model"]).items():
        assert not torch.equal(layer.lora_A.detach(), trained["initial_A"][name]), name
        assert layer.lora_B.detach().abs().max() > 0, name  # B starts at zero


def test_saved_adapter_reproduces_the_trained_model(trained):
    tensors = load_file(trained["run"] / "adapter" / "adapter_model.safetensors")
    assert tensors and all(".lora_A." in key or ".lora_B." in key for key in tensors)
    rebuilt = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    load_adapter(rebuilt, trained["run"] / "adapter")
    rebuilt.eval()  # after loading: the LoRA layers it adds carry dropout
    model = trained["model"].eval()
    ids = torch.randint(0, rebuilt.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits)


# ---------------------------------------------------------------- (3) the schedule


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # warmup 2, total 10: warmup gives (s+1)/3, then decay over the 8 remaining steps.
        ("linear", {0: 1 / 3, 1: 2 / 3, 2: 1.0, 4: 0.75, 6: 0.5, 9: 0.125, 10: 0.0, 12: 0.0}),
        (
            "cosine",
            {
                0: 1 / 3,
                1: 2 / 3,
                2: 1.0,
                4: (1 + math.cos(math.pi / 4)) / 2,
                6: 0.5,
                8: (1 + math.cos(3 * math.pi / 4)) / 2,
                10: 0.0,
                13: 0.0,
            },
        ),
        ("constant", {0: 1 / 3, 1: 2 / 3, 2: 1.0, 7: 1.0, 10: 1.0, 50: 1.0}),
    ],
)
def test_lr_factor_matches_hand_computed_values(schedule, expected):
    for step, factor in expected.items():
        assert lr_factor(step, warmup=2, total=10, schedule=schedule) == pytest.approx(factor, abs=1e-12), step


def test_lr_factor_without_warmup_starts_at_full_rate():
    assert lr_factor(0, warmup=0, total=4, schedule="linear") == 1.0
    assert lr_factor(2, warmup=0, total=4, schedule="linear") == 0.5
    assert lr_factor(0, warmup=0, total=4, schedule="cosine") == 1.0


# ---------------------------------------------------------------- (4) gradient accumulation


def supervised_rows() -> list[dict]:
    """Eight rows of different lengths with 1 to 8 supervised tokens each."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for i in range(8):
        prompt_len, target_len = 3 + (5 * i) % 7, 1 + i
        ids = torch.randint(2, 128, (prompt_len + target_len,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt_len + ids[prompt_len:]})
    return rows


def lora_model_with_nonzero_b() -> torch.nn.Module:
    model = tiny_model("gpt2")
    inject_lora(model, ["q", "v", "o"], rank=2, alpha=4, dropout=0.0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
    return model  # eval mode: GPT-2's own dropout off, so every pass is deterministic


def independent_gradient(model: torch.nn.Module, rows: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean cross-entropy over every supervised token of all rows, row by row with plain logits."""
    model = copy.deepcopy(model)
    total, count = torch.zeros(()), 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        targets = torch.tensor(row["labels"][1:])
        keep = targets != IGNORE
        total = total + F.cross_entropy(logits[keep], targets[keep], reduction="sum")
        count += int(keep.sum())
    loss = total / count
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def sgd_step(model: torch.nn.Module, micro_batches: list[dict], max_grad_norm: float) -> tuple[float, dict]:
    """Run `optimizer_step` with SGD at lr 1, so each parameter moves by exactly minus its gradient."""
    from accelerate import Accelerator

    model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    scheduler = LambdaLR(optimizer, lambda step: 1.0)
    accelerator = Accelerator()
    scorer, optimizer = accelerator.prepare(SupervisedLoss(model), optimizer)
    loss = optimizer_step(accelerator, scorer, optimizer, scheduler, micro_batches, max_grad_norm=max_grad_norm)
    after = dict(model.named_parameters())
    return loss, {n: before[n] - after[n].detach() for n in before}


@pytest.mark.parametrize("split", [[8], [2, 2, 2, 2], [1, 3, 4]])
def test_accumulated_step_weights_every_supervised_token_alike(split):
    model, rows = lora_model_with_nonzero_b(), supervised_rows()
    expected_loss, expected_grad = independent_gradient(model, rows)
    starts = [sum(split[:i]) for i in range(len(split))]
    micro = [collate(rows[s : s + n], pad_id=1) for s, n in zip(starts, split)]
    loss, moved = sgd_step(model, micro, max_grad_norm=0.0)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    for name, grad in expected_grad.items():
        torch.testing.assert_close(moved[name], grad, rtol=1e-4, atol=1e-6)


def trunk_gradient(switches: dict, batch: dict) -> dict[str, torch.Tensor]:
    """Gradients of A and B for one batch, after `prepare_model` with the given switches; all dropout off."""
    model = tiny_model("gpt2").train()
    prepare_model(model, LoraSection(rank=2, alpha=4, dropout=0.0, targets=["q", "v"]), **switches)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
    summed, _ = loss_sum(model, batch)
    summed.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("switch", ["gradient_checkpointing", "compile"])
def test_speed_and_memory_switches_keep_the_gradients(switch):
    batch = collate(supervised_rows(), pad_id=1)
    expected = trunk_gradient({}, batch)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    actual = trunk_gradient({switch: True}, batch)
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    assert compiled == (switch == "compile")
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-6)


def test_prepare_model_swaps_in_pytorchs_gelu_kernel(trained):
    activations = {type(m).__name__ for m in trained["model"].modules() if "GELU" in type(m).__name__}
    assert activations == {"GELU"}


@torch.no_grad()
def mean_token_loss(model: torch.nn.Module, rows: list[dict]) -> float:
    losses = [
        F.cross_entropy(
            model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1],
            torch.tensor(row["labels"][1:]),
            reduction="sum",
        )
        for row in rows
    ]
    return float(sum(losses)) / sum(sum(label != IGNORE for label in row["labels"][1:]) for row in rows)


def test_per_batch_mean_would_differ_so_the_accumulation_test_can_fail():
    """The rows' token counts differ enough that averaging micro-batch means gives another loss."""
    model, rows = lora_model_with_nonzero_b(), supervised_rows()
    batch_means = [mean_token_loss(model, rows[s : s + 2]) for s in range(0, 8, 2)]
    assert abs(sum(batch_means) / 4 - mean_token_loss(model, rows)) > 1e-3


def test_accumulated_step_clips_the_whole_steps_gradient():
    model, rows = lora_model_with_nonzero_b(), supervised_rows()
    _, grad = independent_gradient(model, rows)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grad.values()))
    max_norm = float(norm) / 10
    _, moved = sgd_step(model, [collate(rows[s : s + 2], pad_id=1) for s in range(0, 8, 2)], max_grad_norm=max_norm)
    for name, g in grad.items():
        torch.testing.assert_close(moved[name], g * (max_norm / norm), rtol=1e-3, atol=1e-7)


# ---------------------------------------------------------------- (5) the plan


def plan_steps(plan: StepRows, steps: range) -> list[list[int]]:
    return [plan.rows(step) for step in steps]


def test_plan_covers_each_row_once_per_epoch():
    lengths = [(7 * i) % 23 + 1 for i in range(41)]
    plan = StepRows(lengths, global_batch=8, seed=5)
    assert plan.steps_per_epoch == 6  # 41 rows in steps of at most 8
    for epoch in range(3):
        steps = plan_steps(plan, range(epoch * 6, (epoch + 1) * 6))
        assert all(1 <= len(step) <= 8 for step in steps)
        assert sorted(i for step in steps for i in step) == list(range(41))


def test_plan_is_deterministic_whatever_order_steps_are_asked_in():
    lengths = [(5 * i) % 17 + 1 for i in range(30)]
    forward = plan_steps(StepRows(lengths, 6, seed=9), range(15))
    backward = plan_steps(StepRows(lengths, 6, seed=9), range(14, -1, -1))[::-1]
    assert forward == backward


def test_plan_epochs_and_seeds_give_different_orders():
    lengths = [(5 * i) % 17 + 1 for i in range(30)]
    plan = StepRows(lengths, 3, seed=9)
    per_epoch = plan.steps_per_epoch
    assert plan_steps(plan, range(per_epoch)) != plan_steps(plan, range(per_epoch, 2 * per_epoch))
    assert plan_steps(plan, range(per_epoch)) != plan_steps(StepRows(lengths, 3, seed=10), range(per_epoch))


# ---------------------------------------------------------------- (6) an existing run is never overwritten


def test_fresh_train_into_an_existing_run_is_refused_and_changes_nothing(trained):
    before = snapshot(trained["run"])
    result = runner.invoke(app, ["train", "--recipe", str(trained["recipe_path"])])
    assert result.exit_code == 2
    assert "already holds a run" in result.stderr and "--resume" in result.stderr
    assert snapshot(trained["run"]) == before


# ---------------------------------------------------------------- (7) the hub recipe, offline


GLUE_README = """---
configs:
- config_name: sst2
  data_files:
  - split: train
    path: sst2/train.jsonl
  - split: validation
    path: sst2/validation.jsonl
---
"""


def write_sst2_splits(folder: Path) -> None:
    """16 train and 8 validation rows with glue/sst2's columns: sentence, label (int), idx."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (TINY_DATA / "train.jsonl").read_text().splitlines()[:24]]
    for split, part in (("train", rows[:16]), ("validation", rows[16:])):
        lines = [
            json.dumps({"sentence": r["sentence"], "label": r["label"], "idx": i}) + "\n" for i, r in enumerate(part)
        ]
        (folder / f"{split}.jsonl").write_text("".join(lines))


@pytest.fixture(scope="module")
def hub_lookalikes(tmp_path_factory):
    """A random GPT-2 saved like a hub model, and a dataset folder laid out like the glue repo (config sst2)."""
    root = tmp_path_factory.mktemp("hub")
    model_dir = root / "gpt2-local"
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_MODEL / name, model_dir / name)
    glue = root / "glue-local"
    write_sst2_splits(glue / "sst2")
    (glue / "README.md").write_text(GLUE_README)
    return model_dir, glue


@pytest.mark.slow
def test_hub_recipe_runs_with_only_model_and_data_swapped_for_local_copies(hub_lookalikes, tmp_path):
    model_dir, glue = hub_lookalikes
    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--recipe",
            str(REPO / "recipes" / "gpt2-sst2.toml"),
            "--set",
            f'model.name="{model_dir}"',
            "--set",
            f'data.source="{glue}"',
            "--set",
            "train.max_steps=2",
            "--set",
            "train.batch_size=4",
            "--output",
            str(run),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["throughput"]["steps"] == 2
    assert report["eval"]["examples"] == 8
    saved = load_recipe(run / "recipe.toml")
    hub = load_recipe(REPO / "recipes" / "gpt2-sst2.toml")
    assert saved.model.name == str(model_dir) and saved.data.source == str(glue)
    assert saved.lora == hub.lora
    assert saved.data.model_copy(update={"source": hub.data.source}) == hub.data
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        model_dir
    )


def test_plain_split_folder_needs_the_hub_config_cleared(tmp_path):
    """A folder of train/validation files has no 'sst2' config; `--set data.config=` (empty) clears the recipe's."""
    write_sst2_splits(tmp_path / "sst2")
    hub_recipe = REPO / "recipes" / "gpt2-sst2.toml"
    with pytest.raises(LorafitError, match="sst2"):
        load_rows(load_recipe(hub_recipe, [f'data.source="{tmp_path / "sst2"}"']).data, "train")
    recipe = load_recipe(hub_recipe, [f'data.source="{tmp_path / "sst2"}"', "data.config="])
    assert len(load_rows(recipe.data, "train")) == 16
    assert len(load_rows(recipe.data, "validation")) == 8


# ---------------------------------------------------------------- (8) --json keeps stdout clean


@pytest.mark.slow
def test_train_json_prints_only_the_report_on_stdout(tiny_recipe, tmp_path):
    path = tiny_recipe(train={"max_steps": 1})
    completed = subprocess.run(
        [sys.executable, "-m", "lorafit.cli", "train", "--recipe", str(path), "--json"],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert report == json.loads((tmp_path / "run" / "report.json").read_text())
    assert "eval after training" in completed.stderr
    assert "training" in completed.stderr


# ---------------------------------------------------------------- (9) the other tasks


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("task", ["completion", "text"])
def test_generative_tasks_train_end_to_end(task, tiny_recipe, tmp_path):
    words = ["cat", "dog", "sun", "rain", "film", "song"]
    if task == "completion":
        rows = [{"prompt": f"Say {w}:", "response": f" {w} {w}"} for w in words]
        fields = {"prompt_field": "prompt", "response_field": "response"}
    else:
        rows = [{"body": f"The {w} is here and the {w} is good."} for w in words]
        fields = {"text_field": "body"}
    source = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows),
        "validation": write_jsonl(tmp_path / "valid.jsonl", rows[:3]),
    }
    path = tiny_recipe(
        data={"source": source, "task": task, "template": "{text}", **fields}, train={"max_steps": 2, "batch_size": 2}
    )
    report = train(load_recipe(path), console=quiet())
    assert report["throughput"]["steps"] == 2
    assert report["eval"]["examples"] == 3
    assert "accuracy" not in report["eval"]
    assert report["eval"]["perplexity"] == pytest.approx(math.exp(report["eval"]["loss"]))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and math.isfinite(records[-1]["loss"])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
