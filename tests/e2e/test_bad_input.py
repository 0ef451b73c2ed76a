"""Bad input through the CLI: exit 2, one line on stderr that names the problem, no traceback, nothing written."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import tomli_w
from conftest import TINY_DATA, TINY_MODEL, assert_one_line_error, snapshot, tiny_model
from typer.testing import CliRunner

from lorafit.adapter.save import save_adapter
from lorafit.cli import app
from lorafit.model.inject import inject_lora

runner = CliRunner()
ROWS = (TINY_DATA / "train.jsonl").read_text().splitlines()[:12]
RECIPE = {
    "model": {"name": str(TINY_MODEL)},
    "lora": {"rank": 2, "alpha": 4, "targets": ["q", "v"]},
    "data": {
        "source": {"train": "data/train.jsonl", "validation": "data/validation.jsonl"},
        "task": "classification",
        "labels": ["negative", "positive"],
        "template": "Review: {text}\nSentiment:",
        "max_length": 48,
    },
    "train": {"max_steps": 2, "batch_size": 2},
    "output": {"dir": "run"},
}


# ---------------------------------------------------------------- building one case's files


def write_recipe(work: Path, recipe: dict) -> Path:
    path = work / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    return path


def changed(section: str, key: str, value) -> Callable[[Path], list[str]]:
    """`lorafit train` with one recipe key set to `value` (a new section when it does not exist)."""

    def setup(work: Path) -> list[str]:
        recipe = copy.deepcopy(RECIPE)
        recipe.setdefault(section, {})[key] = value
        return ["train", "-r", str(write_recipe(work, recipe))]

    return setup


def recipe_text(text: str) -> Callable[[Path], list[str]]:
    def setup(work: Path) -> list[str]:
        path = work / "recipe.toml"
        path.write_text(text)
        return ["train", "-r", str(path)]

    return setup


def train_rows(content: str) -> Callable[[Path], list[str]]:
    """`lorafit train` on a train.jsonl whose content is `content`."""

    def setup(work: Path) -> list[str]:
        (work / "data" / "train.jsonl").write_text(content)
        return ["train", "-r", str(write_recipe(work, RECIPE))]

    return setup


def with_model(name: Callable[[Path], str]) -> Callable[[Path], list[str]]:
    def setup(work: Path) -> list[str]:
        recipe = copy.deepcopy(RECIPE)
        recipe["model"]["name"] = name(work)
        return ["train", "-r", str(write_recipe(work, recipe))]

    return setup


def empty_folder(work: Path, name: str) -> Path:
    (work / name).mkdir()
    return work / name


def llama_adapter(work: Path) -> Path:
    """A valid adapter, trained for another architecture: its modules do not exist in GPT-2."""
    model = tiny_model("llama")
    inject_lora(model, ["q", "v"], rank=2, alpha=4.0)
    save_adapter(model, work / "llama-adapter", base_model="tiny-llama", targets=["q", "v"])
    return work / "llama-adapter"


def cli(*args: str | Callable[[Path], object]) -> Callable[[Path], list[str]]:
    """A command line: "RECIPE" is a valid recipe, "WORK" the work folder, a callable builds a file there."""

    def setup(work: Path) -> list[str]:
        recipe = write_recipe(work, RECIPE)
        out = []
        for arg in args:
            if arg == "RECIPE":
                out.append(str(recipe))
            elif callable(arg):
                out.append(str(arg(work)))
            else:
                out.append(arg.replace("WORK", str(work)))
        return out

    return setup


def train_file(name: str) -> dict[str, str]:
    return {"train": name, "validation": "data/validation.jsonl"}


def jsonl(*lines: str) -> str:
    return "\n".join(lines) + "\n"


# case -> (what builds the files and returns the command line, a regex the one line of stderr must match)
CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    # the recipe file and --set
    "missing recipe file": (cli("train", "-r", "WORK/no-such.toml"), r"recipe .*no-such.toml does not exist"),
    "toml syntax error": (recipe_text('[model]\nname = "x"\n[train]\nlr = \n'), r"TOML syntax error.*line 4"),
    "unknown section": (changed("trainer", "lr", 1e-3), r"\[trainer\].*did you mean 'train'"),
    "unknown key, typo": (changed("train", "batch_sise", 4), r"batch_sise.*did you mean 'batch_size'"),
    "unknown key, another tool's name": (changed("train", "learning_rate", 1e-3), r"learning_rate.*mean 'lr'"),
    "wrong type": (changed("lora", "rank", "eight"), r"\[lora\] rank.*integer.*'eight'"),
    "rank zero": (changed("lora", "rank", 0), r"\[lora\] rank.*greater than 0"),
    "dropout one": (changed("lora", "dropout", 1.0), r"\[lora\] dropout.*less than 1"),
    "dropout negative": (changed("lora", "dropout", -0.1), r"\[lora\] dropout"),
    "lr zero": (changed("train", "lr", 0.0), r"\[train\] lr.*greater than 0"),
    "lr negative": (changed("train", "lr", -1e-3), r"\[train\] lr"),
    "batch size zero": (changed("train", "batch_size", 0), r"\[train\] batch_size"),
    "unknown mixed precision": (changed("train", "mixed_precision", "fp8"), r"mixed_precision.*'fp8'"),
    "set without equals": (cli("train", "-r", "RECIPE", "--set", "train.lr"), r"--set 'train.lr' is not section.key"),
    "set without section": (cli("train", "-r", "RECIPE", "--set", "lr=1e-3"), r"--set 'lr=1e-3'"),
    "set unknown key": (cli("train", "-r", "RECIPE", "--set", "train.lrate=1e-3"), r"lrate.*did you mean 'lr'"),
    # the model
    "unknown target for the architecture": (
        changed("lora", "targets", ["q", "query"]),
        r"target 'query' does not exist in this gpt2 model",
    ),
    "missing model folder": (with_model(lambda work: str(work / "no-model")), r"folder .*no-model does not exist"),
    "model folder without config": (with_model(lambda work: str(empty_folder(work, "model"))), r"no config.json"),
    "hub model id while offline": (with_model(lambda work: "gpt2"), r"'gpt2'.*(offline|HF_HUB_OFFLINE)"),
    # the data
    "missing data file": (changed("data", "source", train_file("data/no.jsonl")), r"file .*no.jsonl does not exist"),
    "data file of unknown kind": (changed("data", "source", train_file("recipe.toml")), r"is not one of .jsonl"),
    "hub dataset while offline": (
        changed("data", "source", "nosuchuser/nosuchdataset"),
        r"could not load dataset 'nosuchuser/nosuchdataset'.*offline",
    ),
    "empty data file": (train_rows(""), r"train.jsonl has no rows"),
    "malformed jsonl line": (
        train_rows(jsonl(ROWS[0], ROWS[1], '{"sentence": "cut', ROWS[2])),
        r"train.jsonl line 3 is not valid JSON",
    ),
    "jsonl line not an object": (train_rows(jsonl(ROWS[0], "[1, 2]")), r"train.jsonl line 2 is a JSON list"),
    "missing text field": (changed("data", "text_field", "review"), r"has no field 'review'.*text_field"),
    "missing label field": (changed("data", "label_field", "stars"), r"has no field 'stars'.*label_field"),
    "label outside labels": (
        train_rows(jsonl(ROWS[0], '{"sentence": "ok", "label": 7}')),
        r"row 2: label 7 is not in \[data\] labels",
    ),
    "label word outside labels": (
        train_rows(jsonl('{"sentence": "ok", "label": "neutral"}')),
        r"row 1: label 'neutral' is not in",
    ),
    "template without text": (changed("data", "template", "Review:\nSentiment:"), r"template must contain \{text\}"),
    "no labels for classification": (changed("data", "labels", []), r"labels is empty"),
    # adapters, for eval and merge
    "eval adapter that is not an adapter folder": (
        cli("eval", "-r", "RECIPE", "--adapter", lambda work: empty_folder(work, "stuff")),
        r"is not an adapter directory",
    ),
    "eval adapter folder missing": (
        cli("eval", "-r", "RECIPE", "--adapter", "WORK/gone"),
        r"adapter folder .*gone does not exist",
    ),
    "eval adapter for another base": (
        cli("eval", "-r", "RECIPE", "--adapter", llama_adapter),
        r"adapter targets .* which this gpt2 model does not have",
    ),
    "eval adapter and model both": (
        cli("eval", "-r", "RECIPE", "--adapter", "WORK/a", "--model", "WORK/b"),
        r"not both",
    ),
    "merge adapter for another base": (
        cli("merge", str(TINY_MODEL), llama_adapter, "WORK/merged"),
        r"which this gpt2 model does not have",
    ),
    "merge adapter that is not an adapter folder": (
        cli("merge", str(TINY_MODEL), lambda work: empty_folder(work, "stuff"), "WORK/merged"),
        r"not an adapter directory",
    ),
    "merge hub base while offline": (cli("merge", "gpt2", llama_adapter, "WORK/merged"), r"'gpt2'.*HF_HUB_OFFLINE"),
    "merge into an existing folder": (
        cli("merge", str(TINY_MODEL), llama_adapter, lambda work: empty_folder(work, "merged")),
        r"exists; pass --force",
    ),
}


# ---------------------------------------------------------------- the table


@pytest.fixture
def empty_hf_cache(tmp_path_factory, monkeypatch) -> None:
    """Point every Hugging Face cache at an empty folder outside the work area, so no user cache can answer."""
    home = tmp_path_factory.mktemp("hf-home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")


@pytest.fixture
def work(tmp_path) -> Path:
    """A working folder with a small, valid data set; the recipe's run folder would be work/run."""
    folder = tmp_path / "work"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text(jsonl(*ROWS))
    (folder / "data" / "validation.jsonl").write_text(jsonl(*ROWS[:4]))
    return folder


@pytest.mark.parametrize(("setup", "says"), CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_exit_2_and_writes_nothing(setup, says, work, empty_hf_cache):
    args = setup(work)
    before = snapshot(work)

    result = runner.invoke(app, args)

    line = assert_one_line_error(result)
    assert re.search(says, line), line
    assert snapshot(work) == before
    assert not (work / "run").exists()


def test_debug_shows_the_traceback(work, empty_hf_cache):
    args = changed("data", "template", "no text here")(work)
    result = runner.invoke(app, [*args, "--debug"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert "template must contain {text}" in result.stderr


def test_json_mode_keeps_stdout_empty_on_bad_input(work, empty_hf_cache):
    result = runner.invoke(app, [*changed("lora", "rank", 0)(work), "--json"])
    assert_one_line_error(result)  # which includes: nothing at all on stdout
