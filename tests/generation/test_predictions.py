"""Evaluation by generation in a run and in `lorafit eval`: predictions.jsonl holds one line per prompt with all
of its references, the scores are sacrebleu's on those lines, and they reach metrics.jsonl, keep_best and report.json."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import sacrebleu
import torch
import transformers
from conftest import REPO, TINY_MODEL, write_recipe
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.generate import recipe_decoding
from lorafit.generation.decoding import Decoding
from lorafit.recipe_file import load_recipe
from lorafit.train.loop import train

E2E = REPO / "data" / "e2e-tiny"
ROWS = 12
EVAL = {"metrics": ["bleu", "exact_match"], "num_beams": 2, "no_repeat_ngram_size": 3, "max_new_tokens": 8,
        "stop": ["\n\n"]}


def e2e_recipe(folder, data=None, eval=None, **sections):
    """A completion recipe on data/e2e-tiny with [eval] metrics; `data` and `eval` update its sections."""
    rows = {"source": {"train": str(E2E / "train.jsonl"), "validation": str(E2E / "validation.jsonl")},
            "task": "completion", "prompt_field": "meaning_representation", "response_field": "human_reference",
            "template": "{text} ||", "max_length": 128, "max_eval_examples": ROWS}
    return write_recipe(folder, data={**rows, **(data or {})}, eval={**EVAL, **(eval or {})}, **sections)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e")
    recipe = load_recipe(e2e_recipe(folder, train={"max_steps": 4, "eval_every": 2, "keep_best": True, "lr": 5e-3,
                                                   "label_smoothing": 0.1}))
    return {"report": train(recipe), "dir": folder / "run", "recipe": folder / "recipe.toml"}


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predictions_hold_one_line_per_prompt_with_all_of_its_references(run):
    rows = lines(E2E / "validation.jsonl")[:ROWS]
    expected: dict[str, list[str]] = {}
    for row in rows:
        expected.setdefault(row["meaning_representation"] + " ||", []).append(row["human_reference"])
    found = lines(run["dir"] / "predictions.jsonl")
    assert len(found) == len(expected) < ROWS  # E2E gives several rows per input
    assert {line["prompt"]: line["references"] for line in found} == expected
    assert all(isinstance(line["prediction"], str) and "\n\n" not in line["prediction"] for line in found)
    assert run["report"]["eval"]["prompts"] == len(expected) and run["report"]["eval"]["examples"] == ROWS


def test_report_scores_are_sacrebleus_on_the_written_predictions(run):
    found = lines(run["dir"] / "predictions.jsonl")
    most = max(len(line["references"]) for line in found)
    streams = [[line["references"][k] if k < len(line["references"]) else None for line in found] for k in range(most)]
    bleu = sacrebleu.corpus_bleu([line["prediction"] for line in found], streams).score
    evaluation = run["report"]["eval"]
    assert evaluation["bleu"] == pytest.approx(bleu)
    exact = sum(" ".join(line["prediction"].split()) in line["references"] for line in found) / len(found)
    assert evaluation["exact_match"] == pytest.approx(100 * exact)
    assert {"bleu", "exact_match"} <= set(evaluation["before"])


def test_eval_every_logs_the_metrics_and_keep_best_keeps_the_highest_bleu(run):
    logged = [m for m in lines(run["dir"] / "metrics.jsonl") if "eval_bleu" in m]
    assert [m["step"] for m in logged] == [0, 2, 4]
    best = max(logged[1:], key=lambda m: m["eval_bleu"])  # the first evaluation with a better score wins ties
    assert run["report"]["eval"]["best"]["step"] == best["step"]
    assert run["report"]["eval"]["best"]["bleu"] == best["eval_bleu"]
    assert (run["dir"] / "adapter-best").is_dir()


def test_eval_command_scores_the_adapter_as_the_run_did_and_writes_the_predictions(run, tmp_path):
    out = tmp_path / "predictions.jsonl"
    result = CliRunner().invoke(app, ["eval", "-r", str(run["recipe"]), "--adapter", str(run["dir"] / "adapter"),
                                      "--predictions", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    evaluation = json.loads(result.stdout)["eval"]
    assert evaluation["bleu"] == pytest.approx(run["report"]["eval"]["bleu"])
    assert lines(out) == lines(run["dir"] / "predictions.jsonl")


def test_generation_metrics_with_a_classification_recipe_are_refused(tmp_path):
    result = CliRunner().invoke(app, ["train", "-r", str(write_recipe(tmp_path, eval={"metrics": ["bleu"]}))])
    assert result.exit_code == 2 and "[eval] metrics score generated text" in result.stderr
    assert not (tmp_path / "run").exists()


def test_generate_takes_the_recipes_decoding_with_the_options_on_top(tmp_path):
    recipe = load_recipe(e2e_recipe(tmp_path))
    assert recipe_decoding(recipe) == Decoding(max_new_tokens=8, num_beams=2, no_repeat_ngram_size=3, stop=("\n\n",))
    assert recipe_decoding(recipe, num_beams=5, stop=None).num_beams == 5
    plain = load_recipe(write_recipe(tmp_path, data={"task": "completion"}))
    assert recipe_decoding(plain) == Decoding(max_new_tokens=128)  # generate's own default when [eval] has none


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_two_processes_generate_their_shares_and_score_what_one_process_scores(tmp_path):
    """torchrun with 2 gloo processes: each generates its share of the prompts, the main one writes the file."""
    recipe = e2e_recipe(tmp_path, data={"max_eval_examples": 20}, train={"eval_batch_size": 2},
                        eval={"metrics": ["bleu", "rouge_l", "chrf"]})
    one = CliRunner().invoke(app, ["eval", "-r", str(recipe), "--predictions", str(tmp_path / "one.jsonl"), "--json"])
    assert one.exit_code == 0, one.stderr
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "lorafit", "eval", "-r", str(recipe), "--predictions",
               str(tmp_path / "two.jsonl"), "--json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "RANK", "WORLD_SIZE", "MASTER_"))}
    two = subprocess.run(command, cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    ones, twos = json.loads(one.stdout)["eval"], json.loads(two.stdout)["eval"]
    assert lines(tmp_path / "two.jsonl") == lines(tmp_path / "one.jsonl")
    assert ones["prompts"] == twos["prompts"] > 4
    for key in ("bleu", "rouge_l", "chrf"):
        assert twos[key] == pytest.approx(ones[key], rel=1e-9)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_e2e_reproduction_recipe_runs_offline_on_lookalikes(tmp_path):
    """recipes/gpt2-e2e.toml as shipped, but for its hub model and data set: a small random GPT-2 with 512
    positions, and a dataset folder with e2e_nlg's fields and splits (40 rows each); 2 steps, 8 evaluation rows."""
    model_dir, data_dir = tmp_path / "gpt2-medium-lookalike", tmp_path / "e2e_nlg-lookalike"
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_dir.mkdir()
    for split, source in (("train", "train"), ("validation", "validation"), ("test", "validation")):
        rows = (E2E / f"{source}.jsonl").read_text().splitlines(keepends=True)[:40]
        (data_dir / f"{split}.jsonl").write_text("".join(rows))
    overrides = [f"model.name={model_dir}", f"data.source={data_dir}", f"output.dir={tmp_path / 'run'}",
                 "train.max_steps=2", "data.max_eval_examples=8", "eval.max_new_tokens=6"]
    result = CliRunner().invoke(app, ["train", "-r", str(REPO / "recipes" / "gpt2-e2e.toml"), "--json",
                                      *[part for item in overrides for part in ("--set", item)]])
    assert result.exit_code == 0, result.stderr
    evaluation = json.loads(result.stdout)["eval"]
    assert {"bleu", "rouge_l", "chrf", "exact_match"} <= set(evaluation) and evaluation["prompts"] < 8
    assert len(lines(tmp_path / "run" / "predictions.jsonl")) == evaluation["prompts"]


def test_a_prompt_too_long_for_the_context_keeps_its_last_tokens_and_is_counted():
    from lorafit.data.references import PromptGroup
    from lorafit.generation.decoding import decode
    from lorafit.generation.predictions import judge
    from lorafit.model.load import load_tokenizer
    from lorafit.model.loss import SupervisedLoss
    from lorafit.recipe import EvalSection

    tokenizer = load_tokenizer(str(TINY_MODEL))
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    long, short = list(range(5, 45)), [7, 8, 9]
    prompts = [PromptGroup("long", long, ["a"]), PromptGroup("short", short, ["b"])]
    settings = EvalSection(metrics=["exact_match"], max_new_tokens=8)
    result, found = judge(SupervisedLoss(model).eval(), tokenizer, prompts, settings, batch_size=2)
    assert result["prompts_shortened"] == 1 and result["prompts"] == 2
    decoding = Decoding(max_new_tokens=8)
    assert found[0]["prediction"] == decode(model, tokenizer, [long[-24:]], decoding)[0].text  # 32 - 8 positions
    assert found[1]["prediction"] == decode(model, tokenizer, [short], decoding)[0].text
