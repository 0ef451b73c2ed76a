"""`lorafit eval`: label log-likelihood accuracy and loss against plain transformers and peft, merged vs. adapter."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from conftest import TINY_DATA, TINY_MODEL, assert_one_line_error, write_recipe
from rich.console import Console
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.evaluate import evaluate_recipe
from lorafit.recipe_file import load_recipe
from lorafit.train.loop import train

TEMPLATE = "Review: {text}\nSentiment:"
LABELS = ["negative", "positive"]
EVAL_ROWS = 16
TEST_ROWS = slice(100, 106)
runner = CliRunner()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def model_tokenizer():
    """The shipped tiny model's own tokenizer (conftest's `tokenizer` is a small BPE of its own)."""
    return transformers.AutoTokenizer.from_pretrained(TINY_MODEL)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short run whose data has a third split, `test`; the merged model is written by `lorafit merge`."""
    folder = tmp_path_factory.mktemp("eval")
    test_rows = read_jsonl(TINY_DATA / "validation.jsonl")[TEST_ROWS]
    (folder / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in test_rows))
    source = {
        "train": str(TINY_DATA / "train.jsonl"),
        "validation": str(TINY_DATA / "validation.jsonl"),
        "test": str(folder / "test.jsonl"),
    }
    path = write_recipe(folder, data={"source": source}, train={"lr": 5e-3})
    train(load_recipe(path), console=Console(file=io.StringIO()))
    adapter, merged = folder / "run" / "adapter", folder / "merged"
    result = runner.invoke(app, ["merge", str(TINY_MODEL), str(adapter), str(merged), "--json"])
    assert result.exit_code == 0, result.stderr
    return {
        "recipe": path,
        "adapter": adapter,
        "merged": merged,
        "test_rows": test_rows,
        "merge": json.loads(result.stdout),
    }


def cli_eval_stdout(recipe: Path, *args: str) -> str:
    result = runner.invoke(app, ["eval", "--recipe", str(recipe), *args, "--json"])
    assert result.exit_code == 0, result.stderr
    return result.stdout


def cli_eval(recipe: Path, *args: str) -> dict:
    return json.loads(cli_eval_stdout(recipe, *args))["eval"]


@pytest.fixture(scope="module")
def printed(run) -> dict[str, str]:
    """What `lorafit eval --json` prints for the base, the base plus the adapter, and the merged model."""
    return {
        "base": cli_eval_stdout(run["recipe"]),
        "adapter": cli_eval_stdout(run["recipe"], "--adapter", str(run["adapter"])),
        "merged": cli_eval_stdout(run["recipe"], "--model", str(run["merged"])),
    }


@pytest.fixture(scope="module")
def evals(printed) -> dict[str, dict]:
    return {name: json.loads(stdout)["eval"] for name, stdout in printed.items()}


def label_logprobs(model, tokenizer, sentence: str) -> list[float]:
    """Summed log-probability of each label word's tokens after the templated prompt, with plain logits."""
    prompt = tokenizer(TEMPLATE.format(text=sentence))["input_ids"]
    scores = []
    for label in LABELS:
        target = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
        positions = range(len(prompt) - 1, len(prompt) + len(target) - 1)
        scores.append(sum(logprobs[p, t].item() for p, t in zip(positions, target)))
    return scores


def independent_eval(model, tokenizer, rows: list[dict]) -> dict:
    """Accuracy = argmax over label scores; loss = -(log p of the true label's tokens) per true-label token."""
    model.eval()
    correct, logprob, tokens = 0, 0.0, 0
    for row in rows:
        scores = label_logprobs(model, tokenizer, row["sentence"])
        truth = row["label"]
        correct += int(max(range(len(LABELS)), key=scores.__getitem__) == truth)
        logprob += scores[truth]
        tokens += len(tokenizer(" " + LABELS[truth], add_special_tokens=False)["input_ids"])
    return {"accuracy": correct / len(rows), "loss": -logprob / tokens, "examples": len(rows)}


def assert_same_eval(found: dict, expected: dict) -> None:
    assert found["examples"] == expected["examples"]
    assert found["accuracy"] == expected["accuracy"]
    assert found["loss"] == pytest.approx(expected["loss"], rel=1e-4)
    assert found["perplexity"] == pytest.approx(math.exp(found["loss"]), rel=1e-9)


def base_model():
    return transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL)


def eval_rows() -> list[dict]:
    return read_jsonl(TINY_DATA / "validation.jsonl")[:EVAL_ROWS]


def test_base_eval_matches_plain_transformers(evals, model_tokenizer):
    assert_same_eval(evals["base"], independent_eval(base_model(), model_tokenizer, eval_rows()))


def test_adapter_eval_matches_peft_on_the_same_rows(run, evals, model_tokenizer):
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model(), str(run["adapter"]))
    assert_same_eval(evals["adapter"], independent_eval(model, model_tokenizer, eval_rows()))


def test_merged_model_scores_as_the_adapter_and_unlike_the_base(evals):
    assert evals["merged"]["accuracy"] == evals["adapter"]["accuracy"]
    assert evals["merged"]["loss"] == pytest.approx(evals["adapter"]["loss"], rel=1e-4)
    assert abs(evals["base"]["loss"] - evals["adapter"]["loss"]) > 1e-3


def test_merge_reports_only_rounding_drift_for_an_adapter_trained_with_dropout(run):
    # The run used lora dropout 0.05: unmerged logits must be taken with dropout off, or the drift is noise.
    assert run["merge"]["max_logit_diff"] < 1e-4


@pytest.mark.parametrize("name", ["base", "adapter", "merged"])
def test_eval_json_is_one_object_with_the_eval_keys(printed, name):
    document = json.loads(printed[name])  # the whole of stdout, nothing before or after
    assert set(document) == {"command", "lorafit_version", "model", "adapter", "split", "eval"}
    assert set(document["eval"]) == {"loss", "perplexity", "accuracy", "examples"}
    assert document["eval"]["perplexity"] == pytest.approx(math.exp(document["eval"]["loss"]))


def test_split_option_evaluates_another_split(run, model_tokenizer):
    found = cli_eval(run["recipe"], "--split", "test")
    assert_same_eval(found, independent_eval(base_model(), model_tokenizer, run["test_rows"]))


def test_adapter_and_model_together_are_refused(run):
    result = runner.invoke(
        app, ["eval", "--recipe", str(run["recipe"]), "--adapter", str(run["adapter"]), "--model", str(run["merged"])]
    )
    assert "not both" in assert_one_line_error(result)


def test_text_task_loss_is_the_mean_token_cross_entropy(tmp_path, model_tokenizer):
    texts = ["The film was good.", "A long and very boring song about the sea."]
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    source = {"train": str(tmp_path / "valid.jsonl"), "validation": str(tmp_path / "valid.jsonl")}
    path = write_recipe(tmp_path, data={"source": source, "task": "text", "text_field": "text", "template": "{text}"})
    found = evaluate_recipe(load_recipe(path))

    model, total, count = base_model().eval(), 0.0, 0
    for text in texts:
        ids = model_tokenizer(text)["input_ids"] + [model_tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    assert "accuracy" not in found and found["examples"] == 2
    assert found["loss"] == pytest.approx(total / count, rel=1e-5)
    assert found["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def longest_fitting_prefix(tokenizer, sentence: str, budget: int) -> str:
    """The sentence's longest prefix, in whole tokens, whose templated prompt takes at most `budget` tokens."""
    tokens = tokenizer(sentence)["input_ids"]
    for keep in range(len(tokens), -1, -1):
        prefix = tokenizer.decode(tokens[:keep])
        if len(tokenizer(TEMPLATE.format(text=prefix))["input_ids"]) <= budget:
            return prefix
    raise AssertionError("even the bare template does not fit")


def test_long_rows_keep_their_labels_and_every_eval_row_is_scored(tmp_path, model_tokenizer):
    max_length = 20  # the bare template and a label take 13 tokens of the shipped tokenizer; the rows 22 to 36
    recipe = load_recipe(write_recipe(tmp_path, data={"max_length": max_length}))
    rows = eval_rows()
    label_length = {label: len(model_tokenizer(" " + LABELS[label])["input_ids"]) for label in (0, 1)}
    too_long = [row for row in rows if len(model_tokenizer(TEMPLATE.format(text=row["sentence"]))["input_ids"])
                + label_length[row["label"]] > max_length]
    assert len(too_long) > len(rows) // 2
    found = evaluate_recipe(recipe)
    # every row is scored, on its sentence cut from the end so that the template's tail and the label still fit
    shortened = [{**row, "sentence": longest_fitting_prefix(model_tokenizer, row["sentence"],
                                                            max_length - label_length[row["label"]])} for row in rows]
    assert_same_eval(found, independent_eval(base_model(), model_tokenizer, shortened))
