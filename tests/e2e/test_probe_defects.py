"""The 429-case probe's defects (issue 27), one table row each: the exit code, the one line that says what failed
and what to do (no exception class name), nothing lost or half-written, nothing created by a refused or dry run.

Most rows run the CLI in-process on copies of one trained run (a module fixture); the rows about signals
before the libraries are imported start a process of their own.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomli_w
import torch
from conftest import REPO, TINY_DATA, TINY_MODEL, snapshot, write_jsonl, write_recipe
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import lorafit.adapter.merge
import lorafit.evaluate
import lorafit.model.loss
import lorafit.train.loop
import lorafit.train.preflight
from lorafit.cli import app
from lorafit.train.run_folder import mark

pytestmark = pytest.mark.xdist_group("probe-defects")  # one worker trains the shared run once
runner = CliRunner()
TRAIN_ROWS, EVAL_ROWS = 48, 8
CLASS_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception|Interrupt)\b")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] }}{% if m['role'] == 'assistant' %}"
                 "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:\\n' }}"
                 "{% endif %}")
ADALORA = {"variant": "adalora", "init_rank": 4, "target_rank": 2, "tinit": 1, "tfinal": 1}


# ---------------------------------------------------------------- what the cases share


@dataclass
class Case:
    setup: Callable  # (Context) -> CLI arguments, or a callable returning a result like CliRunner's
    code: int
    line: str  # a regex that the command's last line on stderr matches (a failure's only line)
    writes: bool = False  # whether the command may change the work folder (else it must stay byte for byte)
    then: Callable | None = None  # (Context, result) -> None: further evidence


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Small copies of the shipped sentiment rows, so that every run in the table tokenizes little."""
    folder = tmp_path_factory.mktemp("data")
    for split, rows in (("train", TRAIN_ROWS), ("validation", EVAL_ROWS)):
        lines = (TINY_DATA / f"{split}.jsonl").read_text().splitlines()[:rows]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def recipe_in(folder: Path, rows: Path, **sections) -> Path:
    """A 6-step recipe on the rows in `rows` with checkpoints at steps 2, 4 and 6, written to `folder`/recipe.toml."""
    merged = {"data": {"source": {"train": str(rows / "train.jsonl"), "validation": str(rows / "validation.jsonl")},
                       "max_eval_examples": EVAL_ROWS},
              "train": {"save_every": 2, "eval_batch_size": 8}}
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return write_recipe(folder, **merged)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> Path:
    """One finished run, which the cases copy and break."""
    work = tmp_path_factory.mktemp("trained")
    result = runner.invoke(app, ["train", "-r", str(recipe_in(work, data))])
    assert result.exit_code == 0, result.stderr
    return work / "run"


@pytest.fixture(scope="module")
def stopped_adalora(tmp_path_factory, data) -> Path:
    """An AdaLoRA run stopped by SIGTERM at step 3 (checkpoint saved there)."""
    work = tmp_path_factory.mktemp("adalora")
    with pytest.MonkeyPatch.context() as patch:
        result = stop_at_step(patch, 3, lambda: runner.invoke(app, ["train", "-r", str(adalora_recipe(work, data))]))
    assert result.exit_code == 130, result.stderr
    return work / "run"


def adalora_recipe(folder: Path, data: Path) -> Path:
    return recipe_in(folder, data, lora=ADALORA, train={"save_every": 0})


def stop_at_step(patch, step: int, command: Callable):
    """Run `command` with a SIGTERM sent to this process during optimizer step `step`."""
    real, calls = lorafit.model.loss.loss_sum, []

    def loss_sum(model, batch, *options):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch, *options)

    patch.setattr(lorafit.model.loss, "loss_sum", loss_sum)
    return command()


@dataclass
class Context:
    work: Path  # the case's own folder, snapshotted around the command
    trained: Path
    data: Path
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest

    @property
    def recipe(self) -> Path:
        """The trained run's recipe (outside the work folder)."""
        return self.trained.parent / "recipe.toml"

    def copy_run(self, upto: int | None = None) -> Path:
        """The trained run copied into the work folder; with `upto`, as if stopped after that checkpoint."""
        run = self.work / "run"
        shutil.copytree(self.trained, run, symlinks=True)
        if upto is not None:
            for folder in (run / "checkpoints").iterdir():
                if int(folder.name.split("-")[1]) > upto:
                    shutil.rmtree(folder)
            for name in ("report.json", "curves.png"):
                (run / name).unlink()
            shutil.rmtree(run / "adapter")
        return run

    def resume(self, run: Path, *extra: str) -> list[str]:
        return ["train", "-r", str(self.recipe), "-o", str(run), "--resume", *extra]


def hidden(folder: Path) -> list[str]:
    """Temporary names (.name.XXXX.tmp, .old) anywhere under `folder`: half-written files."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old")))


def edit_tensors(path: Path, change: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    tensors = load_file(str(path))
    save_file({key: change(key, value) for key, value in tensors.items()}, str(path))


def edit_state(checkpoint: Path, **changes) -> None:
    path = checkpoint / "training_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def first_lora(name: str) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """A change to the first tensor whose key contains `name`."""
    done = []

    def change(key: str, value: torch.Tensor) -> torch.Tensor:
        if name in key and not done:
            done.append(key)
            return CHANGES[name](value)
        return value

    return change


CHANGES = {
    "model.": lambda value: value.clone().fill_(float("nan")),
    "exp_avg_sq": lambda value: value.clone().fill_(float("inf")),
    "lora_B": lambda value: value.to(torch.int8),
}


# ---------------------------------------------------------------- 1. sweep follows the run-folder rules


def sweep_over_users_file(ctx):
    (ctx.work / "mine").mkdir()
    (ctx.work / "mine" / "sweep.json").write_text('{"my": "numbers"}')
    return ["sweep", "-r", str(ctx.recipe), "--ranks", "1,2", "-o", str(ctx.work / "mine")]


def sweep_into_a_run(ctx):
    return ["sweep", "-r", str(ctx.recipe), "--ranks", "1,2", "-o", str(ctx.copy_run())]


def sweep_with_a_foreign_sub_run(ctx):
    folder = ctx.work / "sweep"
    (folder / "rank-2").mkdir(parents=True)
    mark(folder, "sweep")
    (folder / "rank-2" / "notes.txt").write_text("mine")
    return ["sweep", "-r", str(ctx.recipe), "--ranks", "1,2", "-o", str(folder)]


# ---------------------------------------------------------------- 2. keep_best without evaluation


NO_EVAL_KEEP_BEST = {"data": {"eval_split": ""}, "train": {"keep_best": True, "eval_every": 2}}


def keep_best_without_eval(*extra: str):
    def setup(ctx):
        return ["train", "-r", str(recipe_in(ctx.work, ctx.data, **NO_EVAL_KEEP_BEST)), *extra]

    return setup


def keep_best_run_that_hit_it(ctx):
    """A run started before the rule (the check patched out), which ended at its last step without a report."""
    recipe = recipe_in(ctx.work, ctx.data, data=NO_EVAL_KEEP_BEST["data"], train={**NO_EVAL_KEEP_BEST["train"],
                                                                                    "max_steps": 2})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lorafit.train.preflight, "check_keep_best", lambda *args, **kwargs: None)
        patch.setattr(lorafit.train.loop, "check_keep_best", lambda *args, **kwargs: None)
        assert runner.invoke(app, ["train", "-r", str(recipe)]).exit_code == 0
    shutil.rmtree(ctx.work / "run" / "adapter")
    (ctx.work / "run" / "report.json").unlink()
    return ["train", "-r", str(recipe), "--resume"]


def finished_without_adapter_best(ctx, result):
    run = ctx.work / "run"
    assert json.loads((run / "report.json").read_text())["throughput"]["steps"] == 2
    assert (run / "adapter").is_dir() and not (run / "adapter-best").exists()


# ---------------------------------------------------------------- 3. a SIGKILL while the marker is written


KILL_WHILE_MARKING = """
import os, signal, sys
from pathlib import Path
import lorafit.storage
from lorafit.train.run_folder import RunLock, mark

lorafit.storage.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # the marker's bytes written, not renamed
folder = Path(sys.argv[1])
RunLock(folder)
mark(folder)
"""


def killed_while_marking(ctx):
    run = ctx.work / "run"
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_MARKING, str(run)], cwd=REPO, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert hidden(run), "the kill should leave the marker's temporary file"
    return ["train", "-r", str(recipe_in(ctx.work, ctx.data))]


def marked_and_finished(ctx, result):
    run = ctx.work / "run"
    assert (run / "lorafit-run.json").is_file() and (run / "report.json").is_file()
    assert hidden(run) == []


# ---------------------------------------------------------------- 4. resume checks what it loads


def resume_broken(break_it: Callable[[Path], None]):
    def setup(ctx):
        run = ctx.copy_run(upto=4)
        break_it(run / "checkpoints" / "step-000004")
        return ctx.resume(run)

    return setup


def renamed_past_schedule(checkpoint: Path) -> None:
    edit_state(checkpoint, step=99)
    checkpoint.rename(checkpoint.with_name("step-000099"))


# ---------------------------------------------------------------- 5. adapter dtypes


def int_adapter(ctx) -> Path:
    adapter = ctx.work / "adapter"
    shutil.copytree(ctx.trained / "adapter", adapter)
    edit_tensors(adapter / "adapter_model.safetensors", first_lora("lora_B"))
    return adapter


# ---------------------------------------------------------------- 6. OS failures as one line, found before training


def in_new_run(make: Callable[[Path], None]):
    """`train` into a folder that `make` prepared."""
    def setup(ctx):
        run = ctx.work / "run"
        run.mkdir()
        make(run)
        return ["train", "-r", str(ctx.recipe), "-o", str(run)]

    return setup


def in_resumed_run(make: Callable[[Path], None]):
    def setup(ctx):
        run = ctx.copy_run(upto=4)
        make(run)
        return ctx.resume(run)

    return setup


def replace_with_folder(name: str) -> Callable[[Path], None]:
    def make(run: Path) -> None:
        path = run / name
        if path.is_dir():
            shutil.rmtree(path)
        path.unlink(missing_ok=True)
        path.mkdir()

    return make


def binary_prompts(ctx):
    (ctx.work / "prompts.txt").write_bytes(b"\xff\xfe\x00\x81 not text \x00" * 10)
    return ["generate", "-r", str(ctx.recipe), "--adapter", str(ctx.trained / "adapter"), "--prompts",
            str(ctx.work / "prompts.txt")]


def with_file_size_limit(ctx):
    """A resume from step 2 under `ulimit -f` 16 KiB: the step-4 checkpoint cannot be written."""
    run = ctx.copy_run(upto=2)
    ctx.kept = snapshot(run / "checkpoints" / "step-000002")
    args = ctx.resume(run)

    def command():
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))
        try:
            return runner.invoke(app, args)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    return command


def step_two_kept_whole(ctx, result):
    run = ctx.work / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    assert snapshot(run / "checkpoints" / "step-000002") == ctx.kept


def curves_fail(ctx):
    args = ["train", "-r", str(recipe_in(ctx.work, ctx.data))]

    def fail(history, path, console):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def command():
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(lorafit.train.loop, "save_curves", fail)
            return runner.invoke(app, args)

    return command


def complete_without_curves(ctx, result):
    run = ctx.work / "run"
    assert (run / "report.json").is_file() and (run / "adapter").is_dir() and not (run / "curves.png").exists()


def output_under_a_file(ctx):
    (ctx.work / "file").write_text("x")
    return ["train", "-r", str(ctx.recipe), "-o", str(ctx.work / "file" / "run")]


def fifo_data(ctx):
    os.mkfifo(ctx.work / "train.jsonl")
    return ["train", "-r", str(recipe_in(ctx.work, ctx.data, data={"source": {"train": str(ctx.work / "train.jsonl")}}))]


# ---------------------------------------------------------------- 7. advice that names the checkpoint, not the run


def garbage_final_facts(ctx):
    run = ctx.copy_run()
    (run / "adapter" / "lorafit.json").write_text("{not json")
    return ctx.resume(run)


# ---------------------------------------------------------------- 8. evaluation rows changed on resume


def eval_rows_replaced(ctx):
    data = ctx.work / "data"
    shutil.copytree(ctx.data, data)
    recipe = recipe_in(ctx.work, data, train={"max_steps": 4})
    assert runner.invoke(app, ["train", "-r", str(recipe)]).exit_code == 0
    run = ctx.work / "run"
    shutil.rmtree(run / "checkpoints" / "step-000004")
    shutil.rmtree(run / "adapter")
    (run / "report.json").unlink()
    others = (TINY_DATA / "validation.jsonl").read_text().splitlines()[EVAL_ROWS:2 * EVAL_ROWS]
    (data / "validation.jsonl").write_text("\n".join(others) + "\n")
    return lambda: runner.invoke(app, ["train", "-r", str(recipe), "--resume"], env={"COLUMNS": "200"})


def before_marked_as_other_rows(ctx, result):
    before = json.loads((ctx.work / "run" / "report.json").read_text())["eval"]["before"]
    assert before["rows_changed"] is True
    assert "(on other rows)" in result.stdout


# ---------------------------------------------------------------- 9. the dry run: faithful, and nothing created


def dry_run_on_training_split(ctx):
    return ["train", "-r", str(recipe_in(ctx.work, ctx.data, data={"eval_split": "train"})), "--dry-run", "--json"]


def shows_the_split_as_trained(ctx, result):
    shown = json.loads(result.stdout)
    assert shown["data"]["train"]["examples"] == TRAIN_ROWS  # all of it, as the run trains on it
    assert shown["data"]["train (evaluation)"]["examples"] == EVAL_ROWS  # capped by max_eval_examples
    assert shown["plan"]["steps_per_epoch"] == math.ceil(TRAIN_ROWS / 4)
    assert any("evaluation reads the training split" in line for line in result.stderr.splitlines())


def nested_output(*extra: str):
    def setup(ctx):
        return ["train", "-r", str(recipe_in(ctx.work, ctx.data)), "-o", str(ctx.work / "a" / "b" / "run"), *extra]

    return setup


# ---------------------------------------------------------------- 10. an interrupted AdaLoRA run is not a dead end


def adalora_stopped(ctx):
    args = ["train", "-r", str(adalora_recipe(ctx.work, ctx.data))]
    return lambda: stop_at_step(ctx.monkeypatch, 3, lambda: runner.invoke(app, args))


def adalora_again(*extra: str):
    def setup(ctx):
        stopped = ctx.request.getfixturevalue("stopped_adalora")
        run = ctx.work / "run"
        shutil.copytree(stopped, run)
        return ["train", "-r", str(stopped.parent / "recipe.toml"), "-o", str(run), *extra]

    return setup


def never_suggests_resume(ctx, result):
    assert "--resume" not in result.stderr


# ---------------------------------------------------------------- 11. merge's files follow the umask


def merge_adapter(ctx):
    return ["merge", str(TINY_MODEL), str(ctx.trained / "adapter"), str(ctx.work / "merged")]


def modes_of_a_plain_write(ctx, result):
    plain = ctx.work / "plain"
    plain.write_bytes(b"x")
    expected = stat.S_IMODE(plain.stat().st_mode)
    for path in (ctx.work / "merged").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == expected, path.name


# ---------------------------------------------------------------- 12. a conversation that starts with the assistant


def chat_dry_run(third: list[dict]):
    """`train --dry-run` on three conversations, the third one `third`."""
    def setup(ctx):
        rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 2
        source = write_jsonl(ctx.work / "chat.jsonl", [*rows, {"messages": third}])
        recipe = tomllib.loads(recipe_in(ctx.work, ctx.data).read_text())
        recipe["data"] = {"source": str(source), "task": "chat", "chat_template": CHAT_TEMPLATE}
        (ctx.work / "recipe.toml").write_text(tomli_w.dumps(recipe))
        return ["train", "-r", str(ctx.work / "recipe.toml"), "--dry-run"]

    return setup


# ---------------------------------------------------------------- friction: signals, torchrun, causes, advice


SIGTERM_WHILE_IMPORTING = """
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-m", "lorafit", *sys.argv[1:]], stderr=subprocess.PIPE, text=True)
deadline = time.monotonic() + 120
while time.monotonic() < deadline and child.poll() is None:
    try:
        maps = open(f"/proc/{child.pid}/maps").read()
    except OSError:
        break
    if "libarrow" in maps or "libtorch" in maps:  # the libraries are loading (datasets' pyarrow, or torch)
        child.send_signal(signal.SIGTERM)
        break
    time.sleep(0.002)
_, stderr = child.communicate()
sys.stderr.write(stderr)
sys.exit(child.returncode)
"""


def sigterm_while_importing(ctx):
    args = ["train", "-r", str(recipe_in(ctx.work, ctx.data))]

    def command():
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_IMPORTING, *args], cwd=ctx.work, env=env,
                              capture_output=True, text=True, timeout=300, check=False)
        return SimpleNamespace(exit_code=done.returncode, stdout=done.stdout, stderr=done.stderr)

    return command


def signal_during(target: object, name: str, args: Callable):
    """The command with a SIGTERM sent to this process from inside `target.name`."""
    def setup(ctx):
        real = getattr(target, name)

        def signalled(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **k)

        argv = args(ctx)

        def command():
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(target, name, signalled)
                return runner.invoke(app, argv)

        return command

    return setup


def torchrun_error_file(ctx):
    ctx.monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(ctx.trained.parent.parent / f"error-{ctx.work.name}.json"))
    return ["train", "-r", str(recipe_in(ctx.work, ctx.data, train={"max_steps": -1}))]


def torchrun_shows_our_line(ctx, result):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=os.environ["TORCHELASTIC_ERROR_FILE"])
    assert result.stderr.strip().removeprefix("error: ") in failure.message
    assert "lorafit exit 2" in failure.message


def adapter_without_checkpoint(*extra: str):
    def setup(ctx):
        run = ctx.copy_run()
        shutil.rmtree(run / "checkpoints")
        (run / "report.json").unlink()
        return ["train", "-r", str(ctx.recipe), "-o", str(run), *extra]

    return setup


def bom_rows(ctx):
    data = ctx.work / "data"
    shutil.copytree(ctx.data, data)
    (data / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + (data / "train.jsonl").read_bytes())
    return ["train", "-r", str(recipe_in(ctx.work, data)), "--dry-run"]


def remote_code_model(ctx):
    model = ctx.work / "custom"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "my-own", "auto_map": {"AutoConfig": "x.XConfig"}}))
    return ["info", "--model", str(model)]


CASES = {
    "1 sweep over a user's sweep.json": Case(
        sweep_over_users_file, 2, r"^error: the sweep folder .*/mine holds files that are not a lorafit sweep \(sweep\.json\)"),
    "1 sweep into a finished run": Case(sweep_into_a_run, 2, r"holds a lorafit run, not a sweep; choose a new or empty"),
    "1 sweep run folder with foreign files": Case(
        sweep_with_a_foreign_sub_run, 2, r"rank-2 holds files that are not a lorafit run \(notes\.txt\)"),
    "2 keep_best without evaluation": Case(
        keep_best_without_eval(), 2, r"keep_best needs evaluation rows, and there are none \(\[data\] eval_split is empty\)"),
    "2 keep_best without evaluation, dry run": Case(keep_best_without_eval("--dry-run"), 2, r"keep_best needs evaluation"),
    "2 keep_best run that hit it finishes": Case(
        keep_best_run_that_hit_it, 0, r"^note: \[train\] keep_best has no evaluation to choose from", writes=True,
        then=finished_without_adapter_best),
    "3 SIGKILL while the marker is written": Case(killed_while_marking, 0, r"", writes=True, then=marked_and_finished),
    "4 step edited in training_state.json": Case(
        resume_broken(lambda c: edit_state(c, step=99)), 2,
        r"checkpoint step-000004 is unreadable \(training_state\.json says step 99, its folder's name step 4\); remove it"),
    "4 step past the schedule": Case(
        resume_broken(renamed_past_schedule), 2, r"step-000099 is unreadable \(its step 99 is past the end of its 6-step"),
    "4 NaN in a LoRA tensor": Case(
        resume_broken(lambda c: edit_tensors(c / "training_state.safetensors", first_lora("model."))), 2,
        r"checkpoint step-000004 is unreadable \(tensor model\.\S+ holds NaN or inf\); remove it"),
    "4 fp16 LoRA tensors": Case(
        resume_broken(lambda c: edit_tensors(c / "training_state.safetensors",
                                             lambda k, v: v.half() if k.startswith("model.") else v)), 2,
        r"step-000004 is unreadable \(tensor model\.\S+ is F16, where lorafit writes F32\)"),
    "4 inf in an optimizer moment": Case(
        resume_broken(lambda c: edit_tensors(c / "training_state.safetensors", first_lora("exp_avg_sq"))), 2,
        r"step-000004 is unreadable \(tensor optimizer\.\d+\.exp_avg_sq holds NaN or inf\)"),
    "5 int8 lora_B in eval": Case(
        lambda ctx: ["eval", "-r", str(ctx.recipe), "--adapter", str(int_adapter(ctx))], 2,
        r"adapter_model\.safetensors stores \S+lora_B\.weight as int8, not as floating point numbers"),
    "5 int8 lora_B in merge": Case(
        lambda ctx: ["merge", str(TINY_MODEL), str(int_adapter(ctx)), str(ctx.work / "merged")], 2, r"as int8"),
    "5 int8 lora_B in generate": Case(
        lambda ctx: ["generate", "-r", str(ctx.recipe), "--adapter", str(int_adapter(ctx)), "good film"], 2,
        r"as int8"),
    "6 lock is a folder": Case(in_new_run(replace_with_folder("lorafit.lock")), 2,
                               r"run/lorafit\.lock is a folder, where lorafit keeps its own file"),
    "6 marker is a folder": Case(in_new_run(replace_with_folder("lorafit-run.json")), 2,
                                 r"lorafit-run\.json is a folder, where lorafit keeps its own file"),
    "6 dangling lock link": Case(in_new_run(lambda run: (run / "lorafit.lock").symlink_to(run / "gone" / "x")), 2,
                                 r"lorafit\.lock is a link, where lorafit keeps its own file"),
    "6 metrics.jsonl is a folder": Case(in_resumed_run(replace_with_folder("metrics.jsonl")), 2,
                                        r"metrics\.jsonl is a folder, where lorafit keeps its own file"),
    "6 metrics.jsonl is a link": Case(
        in_resumed_run(lambda run: (run / "metrics.jsonl").unlink() or (run / "metrics.jsonl").symlink_to("/dev/null")),
        2, r"metrics\.jsonl is a link"),
    "6 curves.png is a folder": Case(in_resumed_run(replace_with_folder("curves.png")), 2, r"curves\.png is a folder"),
    "6 report.json is a folder": Case(in_resumed_run(replace_with_folder("report.json")), 2, r"report\.json is a folder"),
    "6 adapter is a file": Case(in_resumed_run(lambda run: (run / "adapter").write_text("x")), 2,
                                r"adapter is not a folder, where lorafit keeps its own folder"),
    "6 output name over 255 bytes": Case(
        lambda ctx: ["train", "-r", str(ctx.recipe), "-o", str(ctx.work / ("x" * 300) / "run")], 2,
        r"\[output\] dir has a name of 300 bytes \(x+\.\.\.\), over the file system's limit of 255"),
    "6 output under a file": Case(output_under_a_file, 2, r"lies under \S+/file, which is a file; choose a folder"),
    "6 binary --prompts file": Case(binary_prompts, 2, r"prompts file \S+ is not UTF-8 text \(invalid start byte"),
    "6 --prompts is a folder": Case(
        lambda ctx: ["generate", "-r", str(ctx.recipe), "--prompts", str(ctx.work)], 2, r"is a folder, not a file"),
    "6 recipe is a folder": Case(lambda ctx: ["train", "-r", str(ctx.work)], 2, r"^error: recipe \S+ is a folder, not a"),
    "6 data file is a pipe": Case(fifo_data, 2, r"data file \S+ is not a regular file \(a pipe or a device\)"),
    "6 file-size limit": Case(
        with_file_size_limit, 1,
        r"^error: \S+/checkpoints/step-000004/\S+: the file would pass the file-size limit; the newest checkpoint is "
        r"step-000002, continue with: lorafit train --resume -o \S+; raise the limit", writes=True,
        then=step_two_kept_whole),
    "6 only curves.png fails": Case(
        curves_fail, 0, r"^note: \S+/curves\.png: the disk is full; the run is complete without curves\.png; free some",
        writes=True, then=complete_without_curves),
    "7 garbage in a finished run's lorafit.json": Case(
        garbage_final_facts, 2,
        r"the final adapter's \S+/run/adapter/lorafit\.json is unreadable \(.*\); copy it back from \S+step-000006/"),
    "8 evaluation rows changed on resume": Case(
        eval_rows_replaced, 0, r"^note: the evaluation rows differ from those \S+ started with", writes=True,
        then=before_marked_as_other_rows),
    "9 dry run shows the training split as trained": Case(dry_run_on_training_split, 0, r"dry run: nothing",
                                                          then=shows_the_split_as_trained),
    "9 dry run into a nested new folder": Case(nested_output("--dry-run"), 0, r"dry run: nothing was trained"),
    "9 refused run into a nested new folder": Case(nested_output("--resume"), 2, r"has no complete checkpoint"),
    "10 AdaLoRA stopped": Case(
        adalora_stopped, 130, r"^stopped at step 3; checkpoint saved, but AdaLoRA runs cannot be resumed yet .*; start "
        r"a new run with another --output$", writes=True, then=never_suggests_resume),
    "10 AdaLoRA stopped, train again": Case(
        adalora_again(), 2, r"stopped after step-000003, and AdaLoRA runs cannot be resumed yet .*give --output",
        then=never_suggests_resume),
    "10 AdaLoRA stopped, --resume": Case(
        adalora_again("--resume"), 2, r"stopped after step-000003, and AdaLoRA runs cannot be resumed yet",
        then=never_suggests_resume),
    "11 merge writes files with the umask's mode": Case(merge_adapter, 0, r"", writes=True,
                                                        then=modes_of_a_plain_write),
    "12 conversation starting with the assistant": Case(
        chat_dry_run([{"role": "assistant", "content": "I start"}, {"role": "user", "content": "ok"}]), 2,
        r"chat\.jsonl row 3: the conversation starts with the assistant"),
    "SIGTERM while the libraries import": Case(sigterm_while_importing, 130, r"^stopped by a signal; nothing (more )?was"),
    "SIGTERM in eval": Case(
        signal_during(lorafit.evaluate, "evaluate_split", lambda ctx: ["eval", "-r", str(ctx.recipe)]), 130,
        r"^stopped by a signal; nothing more was written$"),
    "SIGTERM in merge while writing": Case(
        signal_during(lorafit.adapter.merge, "copy_tokenizer", merge_adapter), 130, r"^stopped by a signal"),
    "torchrun's summary repeats our line": Case(torchrun_error_file, 2, r"max_steps", then=torchrun_shows_our_line),
    "adapter but no checkpoint, train": Case(
        adapter_without_checkpoint(), 2, r"holds an adapter but no checkpoint to continue from; give --output"),
    "adapter but no checkpoint, --resume": Case(
        adapter_without_checkpoint("--resume"), 2, r"holds an adapter but no checkpoint to continue from"),
    "merge --force over a run": Case(
        lambda ctx: ["merge", str(TINY_MODEL), str(ctx.trained / "adapter"), str(ctx.copy_run()), "--force"], 2,
        r"holds a lorafit run, which --force does not replace"),
    "UTF-8 BOM in data": Case(bom_rows, 0, r"dry run: nothing"),
    "chat tool call": Case(
        chat_dry_run([{"role": "user", "content": "weather?"}, {"role": "assistant", "content": None, "tool_calls": []}]),
        2, r"chat\.jsonl row 3: message 2 of 'messages' is not \{role, content\} with text content"),
    "chat content parts": Case(
        chat_dry_run([{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "yo"}]),
        2, r"chat\.jsonl line 3: message 1 of field 'messages' has \[\{'type': 'text', 'text': 'hi'\}\] as its content"),
    "remote-code model": Case(remote_code_model, 2, r"needs its own Python code to load; .* trust_remote_code = true"),
    "--temperature inf": Case(
        lambda ctx: ["generate", "-r", str(ctx.recipe), "--temperature", "inf", "hi"], 2, r"--temperature inf is not a"),
    "--set value blamed on --set": Case(
        lambda ctx: ["train", "-r", str(ctx.recipe), "--set", "train.lr=-1"], 2, r"^error: --set train\.lr: \[train\]"),
    "[lora] learning_rate": Case(
        lambda ctx: ["train", "-r", str(ctx.recipe), "--set", "lora.learning_rate=1"], 2, r"did you mean \[train\] lr"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_probe_defect(case: Case, tmp_path, trained, data, monkeypatch, request):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    ctx = Context(tmp_path / "work", trained, data, monkeypatch, request)
    ctx.work.mkdir()
    command = case.setup(ctx)
    before = snapshot(ctx.work)
    result = command() if callable(command) else runner.invoke(app, command)

    assert result.exit_code == case.code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines() or [""]
    # a failure ends with its one line (the only error: line); a success says what it noted on a line of its own
    said = lines + result.stdout.splitlines()
    shown = lines[-1] if case.code else next((line for line in said if re.search(case.line, line)), None)
    assert shown is not None and re.search(case.line, shown), result.stderr
    assert not CLASS_NAME.search(shown), shown
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == ([shown] if case.code in (1, 2) else [])
    if not case.writes:
        assert snapshot(ctx.work) == before
    assert hidden(ctx.work) == []
    if case.then:
        case.then(ctx, result)
