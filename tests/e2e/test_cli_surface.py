"""The command line as users read it: help texts, --version, one strict JSON shape, one-line usage errors, a user's
stop as a notice, and library logs only with --debug."""

from __future__ import annotations

import json
import logging
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import typer.main
from conftest import REPO, assert_one_line_error, tiny_config, write_recipe
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.errors import LorafitError
from lorafit.storage import json_text

runner = CliRunner()
WIDE = {"COLUMNS": "200"}


def strict_json(text: str) -> dict:
    """Parse as RFC 8259 JSON: NaN and Infinity, which Python's json accepts by default, are refused."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------- help and version


def help_texts() -> list[tuple[list[str], str]]:
    """(the --help invocation, a help text it shows) for the group, every command and every option."""
    group = typer.main.get_command(app)
    texts = [([], group.help or "")] + [([], p.help or "") for p in group.params]
    for name, command in group.commands.items():
        texts += [([name], command.help or "")] + [([name], getattr(p, "help", None) or "") for p in command.params]
    return texts


def test_help_texts_keep_their_bracketed_section_names():
    bracketed = [(args, name) for args, text in help_texts() for name in re.findall(r"\[[a-z_]+\]", text)]
    assert ([], "[output]") not in bracketed and (["train"], "[output]") in bracketed  # the case the issue found
    for args, name in bracketed:
        shown = runner.invoke(app, [*args, "--help"], env=WIDE)
        assert shown.exit_code == 0
        assert name in shown.stdout, (args, name)


def test_version_is_the_package_metadata():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"lorafit {version('lorafit')}\n"


@pytest.mark.parametrize(
    "args",
    [
        ["train"],  # a missing required option
        ["info", "--rank", "two"],  # not a number
        ["eval", "--recipe"],  # an option without its value
        ["train", "--recipe", "r.toml", "--epochs", "3"],  # an option that does not exist
        ["tune"],  # a command that does not exist
        ["--verbose"],
    ],
)
def test_usage_errors_are_one_line_with_exit_2(args):
    line = assert_one_line_error(runner.invoke(app, args, env=WIDE))
    assert line.endswith("--help")  # where to read the usage


# ---------------------------------------------------------------- JSON


def documented_json_keys() -> dict[str, set[str]]:
    """The README's "JSON output" table: command -> the top-level keys of its --json object."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| command | top-level keys |"):].split("\n\n")[0]
    keys = {}
    for row in table.splitlines()[2:]:
        command, described = row.strip("|").split("|")
        keys[command.strip(" `")] = set(re.findall(r"`([a-z_]+)`", described)) | {"command", "lorafit_version"}
    return keys


@pytest.fixture(scope="module")
def printed(tmp_path_factory) -> dict[str, dict]:
    """Every command's --json output on the shipped tiny model, parsed strictly: train, then eval, merge and info
    of what it trained."""
    folder = tmp_path_factory.mktemp("json")
    recipe = str(write_recipe(folder, train={"max_steps": 2}))
    adapter = str(folder / "run" / "adapter")
    commands = {
        "train": ["train", "--recipe", recipe],
        "eval": ["eval", "--recipe", recipe, "--adapter", adapter],
        "merge": ["merge", str(REPO / "data" / "tiny-gpt2"), adapter, str(folder / "merged")],
        "info": ["info", "--recipe", recipe],
        "export": ["export", adapter, str(folder / "exported"), "--for", "peft"],
    }
    outputs = {}
    for command, args in commands.items():
        result = runner.invoke(app, [*args, "--json"])
        assert result.exit_code == 0, result.stderr
        outputs[command] = strict_json(result.stdout)  # the whole of stdout is one JSON object
    outputs["report.json"] = strict_json((folder / "run" / "report.json").read_text())
    return outputs


def test_the_readme_documents_every_commands_json():
    assert set(documented_json_keys()) == set(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", ["train", "eval", "merge", "info", "export"])
def test_every_commands_json_is_strict_and_has_the_documented_keys(printed, command):
    assert printed[command]["command"] == command
    assert printed[command]["lorafit_version"] == version("lorafit")
    assert set(printed[command]) == documented_json_keys()[command]


def test_train_json_names_the_run_folder_and_the_adapter(printed):
    run, adapter = Path(printed["train"]["run_dir"]), Path(printed["train"]["adapter"])
    assert (run / "report.json").is_file() and (run / "recipe.toml").is_file()
    assert adapter.parent == run and (adapter / "adapter_model.safetensors").is_file()


def test_train_json_is_the_report_file_plus_where_it_was_written(printed):
    report = printed["report.json"]
    assert report["lorafit_version"] == version("lorafit")
    assert {k: v for k, v in printed["train"].items() if k in report} == report
    assert set(printed["train"]) - set(report) == {"command", "run_dir", "adapter"}


def test_eval_json_reads_like_trains_eval(printed):
    """Scoring the saved adapter again gives the numbers train reported after training, under the same keys."""
    after_training = {k: v for k, v in printed["train"]["eval"].items() if k != "before"}
    again = printed["eval"]["eval"]
    assert set(again) == set(after_training)
    for key, value in after_training.items():
        assert again[key] == pytest.approx(value, rel=1e-5), key
    assert printed["eval"]["adapter"] == printed["train"]["adapter"]


def test_a_nan_is_printed_as_null(tiny_recipe, monkeypatch):
    monkeypatch.setattr("lorafit.evaluate.evaluate_recipe",
                        lambda *args, **kwargs: {"loss": float("nan"), "perplexity": float("inf"), "examples": 0})
    result = runner.invoke(app, ["eval", "--recipe", str(tiny_recipe()), "--json"])
    assert result.exit_code == 0, result.stderr
    assert strict_json(result.stdout)["eval"] == {"loss": None, "perplexity": None, "examples": 0}


def test_files_and_json_are_strict_at_any_depth():
    data = {"a": [1.5, float("-inf"), {"b": float("nan")}], "c": (float("inf"),), "d": "NaN"}
    assert strict_json(json_text(data)) == {"a": [1.5, None, {"b": None}], "c": [None], "d": "NaN"}


# ---------------------------------------------------------------- stops and library logs


@pytest.mark.parametrize(
    ("raised", "said"),
    [
        (LorafitError("stopped at step 3; checkpoint saved, continue with --resume", exit_code=130),
         "stopped at step 3; checkpoint saved, continue with --resume"),
        (KeyboardInterrupt(), "stopped by a signal; nothing more was written"),
    ],
)
def test_a_stop_the_user_asked_for_is_a_notice_not_an_error(tiny_recipe, monkeypatch, raised, said):
    def stop(*args, **kwargs):
        raise raised

    monkeypatch.setattr("lorafit.train.loop.train", stop)
    result = runner.invoke(app, ["train", "--recipe", str(tiny_recipe()), "--json"])
    assert result.exit_code == 130
    assert result.stderr.splitlines() == [said]  # no "error:" before it
    assert result.stdout == ""


def log_like_the_hub(*args, **kwargs):
    """What a hub id gives when the hub answers badly: the hub client's retries and a transformers warning."""
    logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 8s [Retry 5/5].")
    logging.getLogger("transformers.modeling_utils").warning("Some weights were not initialized")
    raise LorafitError("model not found")


@pytest.mark.parametrize("debug", [False, True])
def test_hub_and_transformers_logs_only_with_debug(monkeypatch, caplog, debug):
    monkeypatch.setattr("lorafit.report.counts.describe", log_like_the_hub)
    transformers_logs = logging.getLogger("transformers")  # it does not pass records on to the root's handlers
    transformers_logs.addHandler(caplog.handler)
    try:
        result = runner.invoke(app, ["info", "--model", "gpt2", *(["--debug"] if debug else [])])
    finally:
        transformers_logs.removeHandler(caplog.handler)
    assert result.exit_code == 2
    logged = {record.getMessage() for record in caplog.records}
    assert ("Retrying in 8s [Retry 5/5]." in logged) is debug
    assert ("Some weights were not initialized" in logged) is debug


# ---------------------------------------------------------------- info


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_config("gpt2").save_pretrained(folder)
    return str(folder)


def test_info_dtype_sets_the_bytes_of_the_frozen_weights(tiny_dir):
    estimates = {}
    for dtype in ("float32", "bfloat16"):
        result = runner.invoke(app, ["info", "--model", tiny_dir, "--dtype", dtype, "--json"])
        assert result.exit_code == 0, result.stderr
        estimates[dtype] = report = strict_json(result.stdout)
        assert report["dtype"] == dtype
    frozen = estimates["float32"]["total_params"] - estimates["float32"]["trainable_params"]
    weights = {dtype: report["memory"]["lora_estimate"]["weights"] for dtype, report in estimates.items()}
    assert weights["float32"] - weights["bfloat16"] == frozen * (4 - 2)  # LoRA's own A and B stay fp32


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--alpha", "0"], "[lora] alpha"),
        (["--rank", "0"], "[lora] rank"),
        (["--dtype", "bf16"], "bfloat16"),
        (["--targets", ","], "[lora] targets"),
        (["--rank", "1000"], "[lora] rank = 1000 is more than transformer.h.0.attn.c_attn's smaller side"),  # as train
    ],
)
def test_info_refuses_what_a_recipe_refuses(tiny_dir, args, named):
    assert named in assert_one_line_error(runner.invoke(app, ["info", "--model", tiny_dir, *args], env=WIDE))


def test_info_refuses_a_recipe_with_alpha_zero(tiny_dir, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[model]\nname = "{tiny_dir}"\n[lora]\nalpha = 0\n', encoding="utf-8")
    assert "[lora] alpha" in assert_one_line_error(runner.invoke(app, ["info", "--recipe", str(recipe)], env=WIDE))
