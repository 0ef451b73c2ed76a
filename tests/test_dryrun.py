"""`--dry-run`: shows the recipe, model, data and first rows with their supervised tokens, and writes nothing."""

from __future__ import annotations

import json

import pytest
import transformers
from conftest import TINY_MODEL, assert_one_line_error, snapshot, write_jsonl
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.dryrun import marked_row

runner = CliRunner()
ROWS = [{"prompt": "What is two plus two?", "response": " Four."}, {"prompt": "Name a colour.", "response": " Red"}]
TEMPLATE = "Q: {text}\nA:"


@pytest.fixture
def completion_recipe(tiny_recipe, tmp_path):
    source = {split: str(write_jsonl(tmp_path / f"{split}.jsonl", ROWS)) for split in ("train", "validation")}
    return tiny_recipe(data={"source": source, "task": "completion", "template": TEMPLATE, "labels": []})


@pytest.fixture
def no_weights(monkeypatch):
    """Reading any model weights fails the test: a dry run builds the model from its config alone."""
    def refuse(*args, **kwargs):
        raise AssertionError("a dry run read model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_train_dry_run_writes_nothing_and_marks_a_completion_rows_supervised_tokens(completion_recipe, tmp_path,
                                                                                      no_weights):
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["train", "--recipe", str(completion_recipe), "--dry-run"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stderr
    assert snapshot(tmp_path) == before
    eos = transformers.AutoTokenizer.from_pretrained(TINY_MODEL).eos_token
    # The prompt carries no loss; the response and the end-of-text token do, and only they sit between [[ ]].
    assert f"Q: What is two plus two?\nA:[[ Four.{eos}]]" in result.stdout
    assert f"Q: Name a colour.\nA:[[ Red{eos}]]" in result.stdout
    assert "resolved recipe" in result.stdout and 'template = "Q: {text}\\nA:"' in result.stdout
    assert "nothing was trained or written" in result.stdout


def test_train_dry_run_json_counts_rows_and_supervised_tokens(completion_recipe, tmp_path, no_weights):
    result = runner.invoke(app, ["train", "--recipe", str(completion_recipe), "--dry-run", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL)
    responses = [len(tokenizer(row["response"], add_special_tokens=False)["input_ids"]) + 1 for row in ROWS]  # + eos
    lengths = [len(tokenizer(TEMPLATE.format(text=row["prompt"]))["input_ids"]) + n for row, n in zip(ROWS, responses)]
    train = report["data"]["train"]
    assert (train["rows"], train["examples"], train["dropped"]) == (2, 2, 0)
    assert train["supervised_tokens"] == sum(responses)
    assert (train["tokens"], train["length"]["max"]) == (sum(lengths), max(lengths))
    config = transformers.AutoConfig.from_pretrained(TINY_MODEL)
    assert report["model"]["trainable_params"] == 4 * config.n_layer * 4 * config.n_embd  # q and v: A and B, rank 4
    assert report["plan"]["steps"] == 6 and report["plan"]["global_batch"] == 4
    assert report["plan"]["gradient_checkpointing"] is False  # "auto" on a CPU
    assert report["model"]["memory"]["activations"]["total"] > 0
    assert not (tmp_path / "run").exists()


def test_eval_dry_run_shows_the_split_and_writes_nothing(completion_recipe, tmp_path, no_weights):
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["eval", "--recipe", str(completion_recipe), "--dry-run", "--json"])
    assert result.exit_code == 0, result.stderr
    assert list(json.loads(result.stdout)["data"]) == ["validation"]
    assert snapshot(tmp_path) == before


def test_dry_run_refuses_what_the_run_would_refuse(tiny_recipe, tmp_path):
    result = runner.invoke(app, ["train", "--recipe", str(tiny_recipe(train={"keep_best": True})), "--dry-run"],
                           terminal_width=400)
    assert "eval_every" in assert_one_line_error(result)


def test_colour_marks_exactly_the_supervised_tokens():
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL)
    prompt, target = tokenizer("Q: hi\nA:")["input_ids"], tokenizer(" yes", add_special_tokens=False)["input_ids"]
    row = {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}
    text = marked_row(row, tokenizer, colour=True)
    supervised = [text.plain[span.start:span.end] for span in text.spans if "green" in str(span.style)]
    assert text.plain == "Q: hi\nA: yes" and supervised == [" yes"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A finished 3-step run without evaluation ([data] eval_split = ""), logging every 10 steps, and its output."""
    from conftest import write_recipe

    folder = tmp_path_factory.mktemp("short")
    recipe = write_recipe(folder, train={"max_steps": 3, "log_every": 10, "batch_size": 2}, data={"eval_split": ""})
    result = runner.invoke(app, ["train", "--recipe", str(recipe)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return recipe, folder / "run", result.stdout


def test_a_dry_run_on_a_finished_run_describes_it_and_writes_nothing(short_run, no_weights):
    recipe, run, _ = short_run
    before = snapshot(run)
    fresh = runner.invoke(app, ["train", "--recipe", str(recipe), "--dry-run"], env={"COLUMNS": "400"})
    assert fresh.exit_code == 0, fresh.output
    assert f"in {run}: train would refuse: {run} already holds a run, finished at step 3" in fresh.stdout
    resumed = runner.invoke(app, ["train", "--resume", "--output", str(run), "--dry-run", "--json"])
    assert resumed.exit_code == 0, resumed.output
    plan = json.loads(resumed.stdout)["plan"]
    assert (plan["finished"], plan["refused"], plan["steps"]) == (True, None, 3)
    assert snapshot(run) == before


def test_a_short_runs_end_table_shows_its_first_and_last_log_window_and_its_notes_as_written(short_run):
    _, run, printed = short_run
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in losses] == [1, 3]  # one log window of 10 steps would hold them all
    row = next(line for line in printed.splitlines() if "training loss" in line)
    assert f"step 1: {losses[0]['loss']:.4f} -> steps 2-3: {losses[1]['loss']:.4f}" in row
    assert "none: [data] eval_split is empty" in printed  # rich markup would swallow "[data]"


def test_a_plain_lora_dry_run_shows_no_adalora_keys(completion_recipe, no_weights):
    result = runner.invoke(app, ["train", "--recipe", str(completion_recipe), "--dry-run", "--json"])
    assert result.exit_code == 0, result.stderr
    lora = json.loads(result.stdout)["recipe"]["lora"]
    assert lora["variant"] == "lora" and "adalora" not in lora
    printed = runner.invoke(app, ["train", "--recipe", str(completion_recipe), "--dry-run"]).stdout
    assert "[lora.adalora]" not in printed and "init_rank" not in printed and "target_rank" not in printed


@pytest.mark.parametrize("packing", [False, True])
def test_dry_run_plans_as_many_steps_per_epoch_as_the_run_takes(tiny_recipe, tmp_path, packing):
    """One planner for both: with packing the plan counts packed sequences, not rows (it once counted rows)."""
    rows = [{"sentence": " ".join(["good", "bad", "film"][: 1 + i % 3] * (1 + i % 5)), "label": i % 2} for i in range(30)]
    source = str(write_jsonl(tmp_path / "train.jsonl", rows))
    path = tiny_recipe(data={"source": source, "packing": packing, "eval_split": ""},
                       train={"max_steps": 0, "epochs": 1, "batch_size": 4, "save_every": 0})
    dry = runner.invoke(app, ["train", "--recipe", str(path), "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.stderr
    plan = json.loads(dry.stdout)["plan"]
    run = runner.invoke(app, ["train", "--recipe", str(path), "--json"])
    assert run.exit_code == 0, run.stderr
    report = json.loads(run.stdout)
    assert plan["steps_per_epoch"] == plan["steps"] == report["throughput"]["steps"]
    if packing:  # 30 rows of at most 20 tokens fill few 64-token sequences: far fewer steps than 30 rows make
        assert plan["steps_per_epoch"] < 8 and plan["packing"] == report["packing"]
    else:
        assert plan["steps_per_epoch"] == 8  # 30 rows, 4 a step
