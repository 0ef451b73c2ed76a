"""Crashes, signals and --resume: a resumed run ends with exactly the adapter of an uninterrupted one.

Interruptions are placed deterministically: a small wrapper runs the real CLI in a subprocess with
`loss_sum` patched to block inside a chosen step (or `save_file` patched to die halfway through a
checkpoint), and the test kills or signals it there. Resumes run in-process to save interpreter starts.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_DATA, assert_one_line_error, snapshot, write_recipe
from filelock import FileLock
from typer.testing import CliRunner

import lorafit.model.loss
import lorafit.train.loop
from lorafit.cli import app
from lorafit.errors import LorafitError
from lorafit.train.checkpoint import latest_checkpoint
from lorafit.train.run_folder import RunLock

runner = CliRunner()
TRAIN = {"max_steps": 8, "save_every": 3, "batch_size": 2, "log_every": 2, "eval_batch_size": 2}
DATA = {"max_eval_examples": 2}
ADAPTER_WEIGHTS = "adapter/adapter_model.safetensors"
WAIT_S = 300  # a safety net so a broken run fails the test instead of hanging it

WRAPPER = r"""
import os, signal, sys, time
from pathlib import Path

mode, step, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])


def pause_in_step():
    # Block inside the forward pass of optimizer step `step` until the test creates marker/go.
    import lorafit.model.loss
    real, calls = lorafit.model.loss.loss_sum, []

    def loss_sum(model, batch, *options):
        calls.append(1)
        if len(calls) == step:
            (marker / "paused").touch()
            while not (marker / "go").exists():
                time.sleep(0.01)
        return real(model, batch, *options)

    lorafit.model.loss.loss_sum = loss_sum


def die_writing_checkpoint():
    # Write half of checkpoint `step`'s training state into its staging folder, then SIGKILL this process.
    import lorafit.train.checkpoint
    from lorafit.storage import staged_dir
    real = lorafit.train.checkpoint.write_folder

    def write_folder(final, files):
        if f"step-{step:06d}" in str(final):
            with staged_dir(final) as staging:
                data = files[lorafit.train.checkpoint.STATE_TENSORS]
                (staging / lorafit.train.checkpoint.STATE_TENSORS).write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        return real(final, files)

    lorafit.train.checkpoint.write_folder = write_folder


{"pause": pause_in_step, "die": die_writing_checkpoint}[mode]()
from lorafit.cli import app
app(sys.argv[4:], prog_name="lorafit")
"""


# ---------------------------------------------------------------- helpers


def train_cli(recipe: Path, *args: str):
    return runner.invoke(app, ["train", "-r", str(recipe), *args])


def finished(result) -> None:
    assert result.exit_code == 0, (result.stdout, result.stderr)


def spawn(mode: str, step: int, recipe: Path, marker: Path) -> subprocess.Popen:
    """Start `lorafit train` under WRAPPER; its output goes to files in `marker`, so no pipe can fill and block it."""
    marker.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-c", WRAPPER, mode, str(step), str(marker), "train", "-r", str(recipe)]
    with open(marker / "stdout", "wb") as stdout, open(marker / "stderr", "wb") as stderr:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=stdout, stderr=stderr)


def wait_until_paused(process: subprocess.Popen, marker: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not (marker / "paused").exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended before pausing (exit {process.returncode}): {(marker / 'stderr').read_text()}")
        assert time.monotonic() < deadline, "the run never reached the step to pause in"
        time.sleep(0.05)


def finish(process: subprocess.Popen, marker: Path) -> tuple[int, str]:
    """Wait for the run to end (killing it if it hangs); its exit status and stderr."""
    try:
        process.wait(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, (marker / "stderr").read_text()


def checkpoint_entries(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def hidden_entries(run: Path) -> list[str]:
    """Temporary names (.name.XXXX.tmp/.old) anywhere in the run folder."""
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*"))


def assert_matches_reference(run: Path, reference: dict) -> None:
    """The resumed run ends where the uninterrupted one did: same adapter bytes, same loss at every logged step."""
    assert (run / ADAPTER_WEIGHTS).read_bytes() == reference["adapter"]
    assert losses(run) == reference["losses"]
    report = json.loads((run / "report.json").read_text())
    assert report["eval"]["before"] == reference["report"]["eval"]["before"]
    assert report["eval"]["loss"] == reference["report"]["eval"]["loss"]
    assert hidden_entries(run) == []


def uninterrupted_run(folder: Path) -> dict:
    """Train the test recipe in `folder` without interruption, unless a complete run is already there."""
    run = folder / "run"
    if not (run / "report.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        finished(train_cli(write_recipe(folder, train=TRAIN, data=DATA)))
    assert checkpoint_entries(run) == ["step-000003", "step-000006", "step-000008"]
    return {
        "run": run,
        "adapter": (run / ADAPTER_WEIGHTS).read_bytes(),
        "losses": losses(run),
        "report": json.loads((run / "report.json").read_text()),
    }


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict:
    """The same recipe trained without interruption; pytest-xdist workers share one run."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return uninterrupted_run(tmp_path_factory.mktemp("uninterrupted"))
    shared = tmp_path_factory.getbasetemp().parent  # this session's folder, common to its workers
    with FileLock(str(shared / "uninterrupted.lock")):
        return uninterrupted_run(shared / "uninterrupted")


@pytest.fixture
def recipe(tiny_recipe) -> Path:
    return tiny_recipe(train=TRAIN, data=DATA)


def patch_loss(monkeypatch, at_step: int, action) -> None:
    """Call `action(summed_loss)` in place of returning the loss of optimizer step `at_step` (in-process runs)."""
    real, calls = lorafit.model.loss.loss_sum, []

    def loss_sum(model, batch, *options):
        summed, count = real(model, batch, *options)
        calls.append(1)
        return (action(summed) if len(calls) == at_step else summed), count

    monkeypatch.setattr(lorafit.model.loss, "loss_sum", loss_sum)


@pytest.fixture
def main_thread() -> None:
    """Signal handlers are installed only from the main thread; elsewhere SIGINT would stop pytest itself."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")


# ---------------------------------------------------------------- hard kills


def test_sigkill_mid_step_leaves_no_lock_and_resume_ends_with_the_uninterrupted_adapter(recipe, reference, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "marker"
    process = spawn("pause", 7, recipe, marker)  # checkpoints 3 and 6 are written before step 7
    wait_until_paused(process, marker)
    with pytest.raises(LorafitError, match=f"pid {process.pid}"):  # held while it runs
        RunLock(run)
    process.kill()
    returncode, _ = finish(process, marker)

    assert returncode == -signal.SIGKILL
    assert (run / "lorafit.lock").exists()  # the file stays; the OS dropped the lock with the process
    assert checkpoint_entries(run) == ["step-000003", "step-000006"]
    assert latest_checkpoint(run) == run / "checkpoints" / "step-000006"
    assert not (run / "adapter").exists() and not (run / "report.json").exists()

    finished(train_cli(recipe, "--resume"))
    assert_matches_reference(run, reference)


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_complete_one(recipe, reference, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "marker"
    returncode, _ = finish(spawn("die", 6, recipe, marker), marker)

    assert returncode == -signal.SIGKILL
    entries = checkpoint_entries(run)
    partial = [name for name in entries if name.startswith(".")]
    assert [name for name in entries if name not in partial] == ["step-000003"]
    assert len(partial) == 1 and partial[0].startswith(".step-000006.")  # half-written: only under a hidden name
    assert (run / "checkpoints" / partial[0] / "training_state.safetensors").exists()
    assert latest_checkpoint(run) == run / "checkpoints" / "step-000003"

    finished(train_cli(recipe, "--resume"))
    assert checkpoint_entries(run) == ["step-000003", "step-000006", "step-000008"]
    assert_matches_reference(run, reference)


def test_a_second_train_on_a_running_folder_is_refused_naming_the_first_which_ends_as_a_lone_run(
    recipe, reference, tmp_path
):
    run, marker = tmp_path / "run", tmp_path / "marker"
    first = spawn("pause", 2, recipe, marker)
    wait_until_paused(first, marker)
    before = snapshot(run)
    for args in ([], ["--resume"]):
        line = assert_one_line_error(train_cli(recipe, *args))
        assert f"in use by another lorafit train (pid {first.pid})" in line
    assert snapshot(run) == before
    (marker / "go").touch()
    returncode, stderr = finish(first, marker)
    assert returncode == 0, stderr
    assert_matches_reference(run, reference)


# ---------------------------------------------------------------- asking it to stop


def signal_self(signum: int):
    def stand_in(*args, **kwargs):
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal did not stop the run")

    return stand_in


def test_sigterm_while_loading_exits_130_and_leaves_no_folder(recipe, tmp_path, monkeypatch, main_thread):
    monkeypatch.setattr(lorafit.train.loop, "load_model", signal_self(signal.SIGTERM))
    result = train_cli(recipe)
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines() == ["stopped by a signal; nothing to resume"]
    assert not (tmp_path / "run").exists()


def test_sigterm_in_the_final_evaluation_exits_130_and_resume_writes_the_report(
    recipe, reference, tmp_path, monkeypatch, main_thread
):
    run = tmp_path / "run"
    monkeypatch.setattr(lorafit.train.loop, "run_report", signal_self(signal.SIGTERM))
    result = train_cli(recipe)
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines() == [
        f"stopped by a signal; the newest checkpoint is step-000008, continue with: lorafit train --resume -o {run}"
    ]
    assert not (run / "report.json").exists()
    monkeypatch.undo()
    finished(train_cli(recipe, "--resume"))
    assert_matches_reference(run, reference)



def test_sigterm_saves_a_checkpoint_at_that_step_and_resume_finishes_identically(recipe, reference, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "marker"
    process = spawn("pause", 5, recipe, marker)
    wait_until_paused(process, marker)
    process.send_signal(signal.SIGTERM)
    (marker / "go").touch()  # step 5 completes, then the loop stops
    returncode, stderr = finish(process, marker)

    assert returncode == 130
    last_line = stderr.strip().splitlines()[-1]
    assert "stopped at step 5" in last_line and "--resume" in last_line
    assert "Traceback" not in stderr
    assert checkpoint_entries(run) == ["step-000003", "step-000005"]
    assert not (run / "adapter").exists()

    finished(train_cli(recipe, "--resume"))
    assert_matches_reference(run, reference)


def test_ctrl_c_saves_a_checkpoint_exits_130_and_prints_the_command_that_continues(recipe, reference, tmp_path,
                                                                                   monkeypatch, main_thread):
    run = tmp_path / "run"

    def interrupt(summed):
        os.kill(os.getpid(), signal.SIGINT)
        return summed

    patch_loss(monkeypatch, 5, interrupt)
    result = train_cli(recipe)
    assert result.exit_code == 130
    # a notice, not an error: the user asked for the stop
    [line] = result.stderr.strip().splitlines()
    assert line == f"stopped at step 5; checkpoint saved, continue with: lorafit train --resume -o {run}"
    assert checkpoint_entries(run) == ["step-000003", "step-000005"]
    assert not (run / "adapter").exists() and hidden_entries(run) == []
    monkeypatch.undo()
    command = shlex.split(line.split("continue with: ")[1])  # copied and pasted: no recipe needed
    finished(runner.invoke(app, command[1:]))
    assert_matches_reference(run, reference)


def test_a_second_ctrl_c_stops_at_once_without_a_partial_checkpoint(recipe, tmp_path, monkeypatch, main_thread):
    run = tmp_path / "run"

    def interrupt_twice(summed):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return summed

    patch_loss(monkeypatch, 5, interrupt_twice)
    handler = signal.getsignal(signal.SIGINT)
    result = train_cli(recipe)
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines() == [
        f"stopped by a signal; the newest checkpoint is step-000003, continue with: lorafit train --resume -o {run}"
    ]
    assert checkpoint_entries(run) == ["step-000003"]
    assert hidden_entries(run) == []
    assert signal.getsignal(signal.SIGINT) is handler  # the run put the previous handler back


def test_train_help_documents_stopping_and_exit_130():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "SIGTERM" in result.stdout and "130" in result.stdout


# ---------------------------------------------------------------- resume rules


@pytest.fixture
def interrupted(reference, tmp_path) -> Path:
    """A copy of the uninterrupted run's folder as it was after step 6: checkpoints 3, 6 and no adapter."""
    run = tmp_path / "copied-run"
    shutil.copytree(reference["run"], run)
    shutil.rmtree(run / "checkpoints" / "step-000008")
    shutil.rmtree(run / "adapter")
    (run / "report.json").unlink()
    return run


def test_resume_refuses_a_changed_learning_rate(recipe, interrupted):
    before = snapshot(interrupted)
    result = train_cli(recipe, "--resume", "--output", str(interrupted), "--set", "train.lr=5e-4")
    assert "train.lr" in assert_one_line_error(result)
    assert snapshot(interrupted) == before


def test_resume_refuses_a_changed_step_count(recipe, interrupted):
    result = train_cli(recipe, "--resume", "--output", str(interrupted), "--set", "train.max_steps=20")
    assert "train.max_steps" in assert_one_line_error(result)


def test_resume_without_a_checkpoint_is_refused(recipe, tmp_path):
    line = assert_one_line_error(train_cli(recipe, "--resume"))
    assert "no complete checkpoint" in line and "drop --resume" in line
    assert not (tmp_path / "run").exists()


def test_a_new_run_into_an_interrupted_one_is_refused(recipe, interrupted):
    before = snapshot(interrupted)
    line = assert_one_line_error(train_cli(recipe, "--output", str(interrupted)))
    assert "already holds a run" in line and "--resume" in line
    assert snapshot(interrupted) == before


def test_resume_refuses_training_data_that_changed_since_the_run_started(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(TINY_DATA, data)
    source = {"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl")}
    recipe = write_recipe(tmp_path, train={**TRAIN, "max_steps": 4, "save_every": 2}, data={**DATA, "source": source})
    finished(train_cli(recipe))
    run = tmp_path / "run"
    shutil.rmtree(run / "adapter")  # as if stopped after the checkpoint at step 2
    (run / "report.json").unlink()
    rows = (data / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(rows[1:]) + "\n")
    before = snapshot(run)
    result = train_cli(recipe, "--resume")
    assert "training rows differ" in assert_one_line_error(result)
    assert snapshot(run) == before


def test_resume_with_a_changed_log_every_finishes_identically(recipe, interrupted, reference):
    finished(train_cli(recipe, "--resume", "--output", str(interrupted), "--set", "train.log_every=1"))
    assert (interrupted / ADAPTER_WEIGHTS).read_bytes() == reference["adapter"]
    logged = losses(interrupted)
    assert sorted(logged) == [2, 4, 6, 7, 8]
    assert {step: logged[step] for step in (2, 4, 6)} == {step: reference["losses"][step] for step in (2, 4, 6)}
    # A line's loss is the mean over its log window: the reference's step-8 line averages steps 7 and 8.
    assert (logged[7] + logged[8]) / 2 == pytest.approx(reference["losses"][8], rel=1e-6)


# ---------------------------------------------------------------- a loss that blows up


def test_non_finite_loss_stops_with_exit_1_and_keeps_the_last_good_checkpoint(recipe, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    patch_loss(monkeypatch, 4, lambda summed: summed * float("nan"))
    result = train_cli(recipe)

    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "loss became nan at step 4" in lines[0] and "step-000003" in lines[0]
    assert checkpoint_entries(run) == ["step-000003"]
    assert sorted(losses(run)) == [2]
    assert not (run / "adapter").exists() and not (run / "report.json").exists()
    assert hidden_entries(run) == []

    monkeypatch.undo()  # the checkpoint kept is good: resuming from it gives the uninterrupted result
    finished(train_cli(recipe, "--resume"))
    assert_matches_reference(run, reference)
