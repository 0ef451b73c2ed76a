"""Nothing corrupts a run folder or trains nonsense: every refusal is exit 2, one line, no traceback, found before
the weights are read (and, where it needs no data, before tokenizing), with every file in the work folder unchanged.
Also: --resume on a finished run, extending a run, the lock, and the base-weights fingerprint."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import tomli_w
from conftest import TINY_DATA, TINY_MODEL, assert_one_line_error, snapshot
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import lorafit.train.loop
from lorafit.cli import app
from lorafit.errors import LorafitError
from lorafit.model.load import weights_fingerprint
from lorafit.train.optimizer import lr_factor
from lorafit.train.resume import check_length
from lorafit.train.run_folder import LOCK, MARKER, RunLock

runner = CliRunner()
RECIPE = {
    "model": {"name": str(TINY_MODEL)},
    "lora": {"rank": 2, "alpha": 4, "targets": ["q", "v"]},
    "data": {
        "source": {"train": str(TINY_DATA / "train.jsonl"), "validation": str(TINY_DATA / "validation.jsonl")},
        "labels": ["negative", "positive"],
        "template": "Review: {text}\nSentiment:",
        "max_length": 48,
        "max_eval_examples": 2,
    },
    "train": {"max_steps": 2, "batch_size": 2, "save_every": 1, "eval_batch_size": 2, "log_every": 1},
    "output": {"dir": "run"},
}
STATE = "checkpoints/step-000002/training_state"


def write_recipe(folder: Path, recipe: dict = RECIPE, **sections) -> Path:
    recipe = copy.deepcopy(recipe)
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = folder / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished two-step run of RECIPE (linear schedule, a checkpoint at each step), copied by the cases."""
    folder = tmp_path_factory.mktemp("finished")
    result = runner.invoke(app, ["train", "-r", str(write_recipe(folder))])
    assert result.exit_code == 0, result.output
    return folder / "run"


# ---------------------------------------------------------------- building one case's files


def train(*args: str, **sections) -> Callable[[Path], list[str]]:
    """`lorafit train` on RECIPE with `sections` changed and `args` added ("WORK" is the work folder)."""
    return lambda work: ["train", "-r", str(write_recipe(work, **sections)), *(a.replace("WORK", str(work)) for a in args)]


def run_copy(change: Callable[[Path], None], *args: str, **sections) -> Callable[[Path], list[str]]:
    """`lorafit train` on a copy of the finished run (work/run), after `change(run)`."""

    def setup(work: Path, finished: Path) -> list[str]:
        shutil.copytree(finished, work / "run")
        change(work / "run")
        return train(*args, **sections)(work)

    return setup


def unfinished(run: Path) -> None:
    """As if stopped during the final evaluation: the last checkpoint, no report."""
    (run / "report.json").unlink()


def keep_model_tensors(keep: bool) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        unfinished(run)
        path = run / f"{STATE}.safetensors"
        tensors = load_file(path)
        save_file({k: v for k, v in tensors.items() if k.startswith("model.") == keep}, path)

    return change


def state_json(text: str) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        unfinished(run)
        (run / f"{STATE}.json").write_text(text)

    return change


def model_copy(work: Path, pickles_only: bool = False) -> Path:
    shutil.copytree(TINY_MODEL, work / "model")
    if pickles_only:
        (work / "model" / "model.safetensors").unlink()
        (work / "model" / "pytorch_model.bin").write_bytes(b"never read")
    return work / "model"


def adapter_copy(change: Callable[[Path], None], *command: str) -> Callable[[Path, Path], list[str]]:
    """A command on a copy of the finished run's adapter (WORK/adapter) after `change(adapter)`."""

    def setup(work: Path, finished: Path) -> list[str]:
        shutil.copytree(finished / "adapter", work / "adapter")
        change(work / "adapter")
        recipe = write_recipe(work)
        return [a.replace("WORK", str(work)).replace("RECIPE", str(recipe)) for a in command]

    return setup


def alpha_nan(adapter: Path) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": math.nan}))


def scaled_weights(factor: float, first_only: bool = False) -> Callable[[Path], None]:
    def change(adapter: Path) -> None:
        tensors = load_file(adapter / "adapter_model.safetensors")
        for index, key in enumerate(sorted(tensors)):
            if not first_only or index == 0:
                tensors[key] = tensors[key].abs() * factor + factor  # no zero left, so factor reaches the product
        save_file(tensors, adapter / "adapter_model.safetensors")

    return change


def with_home(work: Path) -> list[str]:
    (work / "home").mkdir()
    return train(output={"dir": "home"})(work)


def output_file(work: Path) -> list[str]:
    (work / "run").write_text("a file")
    return train()(work)


def foreign_folder(work: Path) -> list[str]:
    (work / "run").mkdir()
    (work / "run" / "report.json").write_text("{}")
    return train()(work)


# case -> (setup(work[, finished run]) -> command line, regex the one line must match)
CASES: dict[str, tuple[Callable, str]] = {
    # the output folder
    "dir is the recipe's folder": (train(output={"dir": "."}), r"holds files that are not a lorafit run \(recipe.toml"),
    "empty --output": (train("--output", ""), r"\[output\] dir.*at least 1 character"),
    "empty output.dir by --set": (train("--set", "output.dir="), r"\[output\] dir.*at least 1 character"),
    "dir is the model folder": (
        lambda work: train(model={"name": str(model_copy(work))}, output={"dir": "model"})(work),
        r"inside the model folder",
    ),
    "dir is the root": (train(output={"dir": "/"}), r"is the file system's root"),
    "dir is the home folder": (with_home, r"is your home folder"),
    "dir is a file": (output_file, r"is a file, not a folder"),
    "dir holds other files": (foreign_folder, r"not a lorafit run \(report.json\)"),
    # the recipe against the model and tokenizer
    "wrong target": (train(lora={"targets": ["q", "qq"]}), r"target 'qq' does not exist in this gpt2 model"),
    "rank above the layer": (train(lora={"rank": 200}), r"rank = 200 is more than .*c_attn's smaller side \(128\)"),
    "AdaLoRA init_rank above the layer": (
        train(lora={"variant": "adalora", "adalora": {"init_rank": 200}}),
        r"\[lora.adalora\] init_rank = 200 is more than .*c_attn's smaller side \(128\)",
    ),
    "hsdp groups that do not divide the processes": (
        train(train={"parallel": "hsdp", "shard_size": 3}),
        r"parallel = 'hsdp' shards the model over groups of 3 processes, which does not divide the 1 processes",
    ),
    "max_length above the context": (train(data={"max_length": 300}), r"max_length = 300 .* context of 256"),
    "lr inf": (train(train={"lr": math.inf}), r"\[train\] lr: input should be a finite number"),
    "lr nan": (train(train={"lr": math.nan}), r"\[train\] lr: input should be a finite number"),
    "alpha inf": (train(lora={"alpha": math.inf}), r"\[lora\] alpha: input should be a finite number"),
    "seed -1": (train(train={"seed": -1}), r"\[train\] seed: input should be greater than or equal to 0"),
    "seed above 32 bits": (train(train={"seed": 2**32}), r"\[train\] seed: input should be less than"),
    "empty label word": (train(data={"labels": ["", "positive"]}), r"labels: every label must be a non-empty word"),
    "repeated label word": (train(data={"labels": ["good", "good"]}), r"labels 'good' and 'good' tokenize to the same ids"),
    # pickles
    "train on a pickles-only model": (
        lambda work: train(model={"name": str(model_copy(work, pickles_only=True))})(work),
        r"holds only pickled weights \(pytorch_model.bin\).*save_pretrained.*allow_pickle = true",
    ),
    "eval a pickles-only model": (
        lambda work: ["eval", "-r", str(write_recipe(work)), "--model", str(model_copy(work, pickles_only=True))],
        r"holds only pickled weights",
    ),
    "merge into a pickles-only base": (
        lambda work, finished: ["merge", str(model_copy(work, pickles_only=True)), str(finished / "adapter"),
                                str(work / "merged")],
        r"holds only pickled weights",
    ),
    # an existing run
    "fresh train into a finished run": (
        run_copy(lambda run: None), r"already holds a run, finished at step 2; to train it longer: lorafit train --resume -o \S+ --set train.max_steps"
    ),
    "fresh train into a stopped run": (run_copy(unfinished), r"already holds a run \(stopped after step-000002\)"),
    "resume with a changed lr and no recipe.toml": (
        run_copy(lambda run: (run / "recipe.toml").unlink(), "--resume", train={"lr": 1e-2}),
        r"gives train.lr = 0.01 where the run in .* has 0.0002, and a resume cannot change it",
    ),
    "resume from a state without the LoRA tensors": (
        run_copy(keep_model_tensors(False), "--resume"),
        r"checkpoint step-000002 is unreadable \(tensor model\..*lora_A is missing\); remove it to resume from the one before",
    ),
    "resume from a state without the optimizer": (
        run_copy(keep_model_tensors(True), "--resume"), r"step-000002 is unreadable \(tensor optimizer.0.exp_avg is missing"
    ),
    "resume from a state that is a list": (run_copy(state_json("[]"), "--resume"), r"step-000002 is unreadable"),
    "resume from a state of wrong keys": (
        run_copy(state_json('{"step": 2, "progress": {"nonsense": 1}}'), "--resume"), r"step-000002 is unreadable"
    ),
    "resume from a state that is not JSON": (run_copy(state_json("{no"), "--resume"), r"step-000002 is unreadable"),
    "extend a linear schedule after warmup": (
        run_copy(lambda run: None, "--resume", "--set", "train.max_steps=4"),
        r"train.max_steps .* changed from 2 to 4 steps, but the linear schedule's learning rate after warmup",
    ),
    "shorten below the step reached": (
        run_copy(unfinished, "--resume", "--set", "train.max_steps=1"), r"gives 1 steps but the run is at step 2",
    ),
    # adapters that are not finite
    "eval an adapter with lora_alpha NaN": (
        adapter_copy(alpha_nan, "eval", "-r", "RECIPE", "--adapter", "WORK/adapter"), r"lora_alpha = nan, not a finite"
    ),
    "merge an adapter with inf": (
        adapter_copy(scaled_weights(math.inf, first_only=True), "merge", str(TINY_MODEL), "WORK/adapter", "WORK/merged"),
        r"holds NaN or inf in .*lora_A",
    ),
    "merge whose result overflows": (
        adapter_copy(scaled_weights(1e30), "merge", str(TINY_MODEL), "WORK/adapter", "WORK/merged"),
        r"gives NaN or inf in .*; nothing was written",
    ),
}
# refusals that need the tokenized rows (a step count from the data); every other one comes before tokenizing
AFTER_TOKENIZING = {"shorten below the step reached", "extend a linear schedule after warmup"}


@pytest.fixture
def expensive_work(monkeypatch) -> list[str]:
    """Record (and refuse) train's tokenizing and weight loading."""
    called = []

    def refuse(name):
        def stand_in(*args, **kwargs):
            called.append(name)
            raise AssertionError(f"{name} ran before a refusal")

        return stand_in

    monkeypatch.setattr(lorafit.train.loop, "tokenize_split", refuse("tokenize"))
    monkeypatch.setattr(lorafit.train.loop, "load_model", refuse("load_model"))
    return called


@pytest.mark.parametrize(("setup", "says"), CASES.values(), ids=CASES.keys())
def test_refusal_is_one_line_exit_2_found_early_and_changes_nothing(
    setup, says, request, tmp_path, monkeypatch, finished_run, expensive_work
):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(work / "home"))
    args = setup(work, finished_run) if setup.__code__.co_argcount == 2 else setup(work)
    if request.node.callspec.id in AFTER_TOKENIZING:
        monkeypatch.undo()
        monkeypatch.setenv("HOME", str(work / "home"))
    before = snapshot(work)

    result = runner.invoke(app, args)

    line = assert_one_line_error(result)
    assert re.search(says, line), line
    assert expensive_work == []
    assert snapshot(work) == before
    assert not Path("/recipe.toml").exists()


def test_adalora_is_checked_at_the_rank_it_starts_from_not_at_lora_rank():
    """AdaLoRA's layers start at [lora.adalora] init_rank; [lora] rank is not used, so it is not checked either."""
    import transformers

    from lorafit.recipe import validate
    from lorafit.train.preflight import check_lora

    config = transformers.AutoConfig.from_pretrained(TINY_MODEL)
    recipe = validate({"model": {"name": str(TINY_MODEL)}, "lora": {"variant": "adalora", "rank": 1000}})
    shapes = check_lora(config, recipe)
    assert shapes["transformer.h.0.attn.c_attn.lora_A"] == (2 * recipe.lora.adalora.init_rank, config.n_embd)


# ---------------------------------------------------------------- a lifecycle with one next step


def test_resume_on_a_finished_run_does_nothing_and_says_so(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    result = runner.invoke(app, ["train", "-r", str(write_recipe(tmp_path)), "--resume", "--json"])
    assert result.exit_code == 0, result.output
    assert "is finished (2 steps), nothing to do" in result.stderr and "train.max_steps" in result.stderr
    printed = {k: v for k, v in json.loads(result.stdout).items() if k not in ("command", "run_dir", "adapter")}
    assert printed == json.loads((run / "report.json").read_text())
    assert snapshot(run) == before


def train_steps(folder: Path, steps: int, *args: str) -> Path:
    constant = {"schedule": "constant", "warmup_steps": 0, "save_every": 0, "max_steps": steps, "log_every": 1}
    result = runner.invoke(app, ["train", "-r", str(write_recipe(folder, train=constant)), *args])
    assert result.exit_code == 0, result.output
    return folder / "run"


def test_extending_a_finished_constant_run_by_n_steps_equals_one_run_of_the_total(tmp_path):
    (tmp_path / "short").mkdir()
    (tmp_path / "long").mkdir()
    extended = train_steps(tmp_path / "short", 2)
    train_steps(tmp_path / "short", 2, "--resume", "--set", "train.max_steps=3")
    lone = train_steps(tmp_path / "long", 3)

    for name in ("adapter/adapter_model.safetensors", "checkpoints/step-000003/training_state.safetensors"):
        assert (extended / name).read_bytes() == (lone / name).read_bytes(), name
    losses = [[m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
              for run in (extended, lone)]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    assert json.loads((extended / "report.json").read_text())["throughput"]["steps"] == 3


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_a_run_may_change_its_length_only_while_its_steps_keep_their_learning_rates(schedule):
    """`check_length` against the schedule itself: a new length is allowed only when every step taken so far had
    the rate it would have in the new length, and always for a run still in warmup, whatever the schedule."""
    warmup, before = 3, 6
    for step in range(1, before + 1):
        for after in sorted({step, before - 1, before + 3, 2 * before}):
            if after < step or after == before:
                continue
            same_rates = all(lr_factor(s, warmup=warmup, total=before, schedule=schedule)
                             == lr_factor(s, warmup=warmup, total=after, schedule=schedule) for s in range(step))
            try:
                check_length(step, before, after, schedule, warmup)
                allowed = True
            except LorafitError:
                allowed = False
            if allowed:
                assert same_rates, (step, after)
            if step <= warmup or schedule == "constant":
                assert allowed, (step, after)



@pytest.mark.parametrize(("batch_size", "grad_accum", "world"), [(16, 1, 2), (4, 2, 2), (6, 1, 4), (3, 1, 2)])
def test_the_note_on_several_processes_gives_settings_that_train_as_one_process_does(batch_size, grad_accum, world):
    """The global batch is batch_size × grad_accum × processes; the --set keys the note gives make it one process's."""
    from lorafit.data.plan import global_batch_split
    from lorafit.recipe import TrainSection
    from lorafit.train.preflight import batch_of_processes

    settings = TrainSection(batch_size=batch_size, grad_accum=grad_accum)
    text = batch_of_processes(settings, world)
    assert f"a global batch of {batch_size * grad_accum * world} rows a step" in text
    advice = dict(re.findall(r"--set train\.(\w+)=(\d+)", text))
    if batch_size * grad_accum % world:
        assert advice == {} and "no global_batch trains as one does" in text
        return
    same = settings.model_copy(update={key: int(value) for key, value in advice.items()})
    assert same.batch_size * global_batch_split(same, world) * world == batch_size * grad_accum

# ---------------------------------------------------------------- the lock and the marker


def test_a_locked_folder_is_refused_naming_the_holders_pid(tmp_path):
    holder = RunLock(tmp_path / "run")
    try:
        with pytest.raises(LorafitError, match=rf"in use by another lorafit train \(pid {__import__('os').getpid()}\)"):
            RunLock(tmp_path / "run")
    finally:
        holder.release()
    RunLock(tmp_path / "run").release()  # released: free again


@pytest.mark.parametrize("code", ["ENOLCK", "EOPNOTSUPP"])
def test_a_file_system_without_locks_is_one_line_naming_the_fix(tmp_path, monkeypatch, code):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(getattr(errno, code), "not supported")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(LorafitError, match="does not support file locks") as refused:
        RunLock(tmp_path / "run")
    assert "\n" not in str(refused.value) and "local disk" in str(refused.value)
    assert refused.value.exit_code == 2
    assert not (tmp_path / "run").exists()  # the folder it made for the lock is gone again


def test_a_lock_on_a_folder_where_no_run_began_leaves_nothing(tmp_path):
    RunLock(tmp_path / "new").release()
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    RunLock(tmp_path / "empty").release()
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_run_folder_is_marked_before_it_holds_anything_else(finished_run):
    assert (finished_run / MARKER).is_file() and (finished_run / LOCK).is_file()
    assert (finished_run / LOCK).read_bytes() == b""  # the PID is read from the OS, so refusals write nothing


# ---------------------------------------------------------------- the base model's fingerprint


def test_weights_fingerprint_changes_with_the_values_and_not_with_the_folder(tmp_path):
    config = json.loads((TINY_MODEL / "config.json").read_text())
    copy_a, copy_b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(TINY_MODEL, copy_a)
    shutil.copytree(TINY_MODEL, copy_b)
    assert weights_fingerprint(str(copy_a), config) == weights_fingerprint(str(TINY_MODEL), config)
    tensors = load_file(copy_b / "model.safetensors")
    save_file({k: v + 1e-3 for k, v in tensors.items()}, copy_b / "model.safetensors", metadata={"format": "pt"})
    assert (copy_b / "model.safetensors").stat().st_size == (copy_a / "model.safetensors").stat().st_size
    assert weights_fingerprint(str(copy_b), config) != weights_fingerprint(str(copy_a), config)


def test_resume_refuses_base_weights_changed_in_place(tmp_path):
    model = model_copy(tmp_path)
    recipe = write_recipe(tmp_path, model={"name": str(model)}, train={"max_steps": 1})
    assert runner.invoke(app, ["train", "-r", str(recipe)]).exit_code == 0
    (tmp_path / "run" / "report.json").unlink()  # stopped during the final evaluation
    tensors = load_file(model / "model.safetensors")
    save_file({k: v * 1.01 for k, v in tensors.items()}, model / "model.safetensors", metadata={"format": "pt"})
    before = snapshot(tmp_path / "run")
    line = assert_one_line_error(runner.invoke(app, ["train", "-r", str(recipe), "--resume"]))
    assert "base model's weights" in line and "differ" in line
    assert snapshot(tmp_path / "run") == before


def test_nan_adapter_is_refused_by_the_loader(finished_run, tmp_path):
    from lorafit.adapter.load import load_adapter
    from lorafit.model.load import load_model

    shutil.copytree(finished_run / "adapter", tmp_path / "adapter")
    scaled_weights(math.nan, first_only=True)(tmp_path / "adapter")
    with pytest.raises(LorafitError, match="NaN or inf"):
        load_adapter(load_model(str(TINY_MODEL)), tmp_path / "adapter")
