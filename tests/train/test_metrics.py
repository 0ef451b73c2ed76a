"""What a run records: the log window's mean loss, TensorBoard through accelerate, eval_every, keep_best, curves.png."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error
from rich.console import Console
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.report import curves
from lorafit.train.metrics import improves

runner = CliRunner()
EVAL_EVERY = 2
STEPS = 4


def metrics_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One run logging every 2 steps to TensorBoard, scored every 2 steps and keeping the best adapter, and the
    same run logging every step."""
    from conftest import write_recipe

    runs = {}
    for name, train in {
        "tracked": {"log_every": 2, "eval_every": EVAL_EVERY, "keep_best": True, "report_to": ["tensorboard"],
                    "save_every": 2},
        "every_step": {"log_every": 1},
    }.items():
        folder = tmp_path_factory.mktemp(name)
        path = write_recipe(folder, train={"max_steps": STEPS, "lr": 3e-3, **train})
        result = runner.invoke(app, ["train", "--recipe", str(path)])
        assert result.exit_code == 0, result.stderr
        runs[name] = folder / "run"
    return runs


def test_logged_loss_is_the_mean_over_the_log_window(tracked):
    every_step = {m["step"]: m["loss"] for m in metrics_of(tracked["every_step"])}
    windows = {m["step"]: m["loss"] for m in metrics_of(tracked["tracked"]) if "loss" in m}
    assert list(windows) == [2, 4]
    for step, loss in windows.items():
        assert loss == pytest.approx((every_step[step - 1] + every_step[step]) / 2, rel=1e-5)


def test_tensorboard_event_file_holds_the_logged_values(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tracked["tracked"] / "logs").rglob("events.out.tfevents.*"))
    assert events
    board = EventAccumulator(str(events[0].parent))
    board.Reload()
    lines = metrics_of(tracked["tracked"])
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                     ("eval/accuracy", "eval_accuracy"), ("eval/loss", "eval_loss")):
        logged = [(line["step"], line[key]) for line in lines if key in line]
        read = [(event.step, event.value) for event in board.Scalars(tag)]
        assert [step for step, _ in read] == [step for step, _ in logged], tag
        assert [value for _, value in read] == pytest.approx([value for _, value in logged], rel=1e-6), tag


def test_eval_every_scores_before_training_every_n_steps_and_at_the_end(tracked):
    scored = [line["step"] for line in metrics_of(tracked["tracked"]) if "eval_loss" in line]
    assert scored == [0, *range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)]
    report = json.loads((tracked["tracked"] / "report.json").read_text())
    last = metrics_of(tracked["tracked"])[-1]
    assert last["eval_loss"] == report["eval"]["loss"]


def test_keep_best_keeps_the_adapter_of_the_best_scored_step(tracked):
    run = tracked["tracked"]
    scores = [(line["eval_accuracy"], line["step"]) for line in metrics_of(run) if "eval_accuracy" in line]
    best_accuracy = max(accuracy for accuracy, step in scores if step > 0)
    best_step = min(step for accuracy, step in scores if step > 0 and accuracy == best_accuracy)  # ties: the first
    # Step 2 is checkpointed (save_every = 2) and the last step is the final adapter: both kept independently.
    source = run / "adapter" if best_step == STEPS else run / "checkpoints" / f"step-{best_step:06d}" / "adapter"
    kept = (run / "adapter-best" / "adapter_model.safetensors").read_bytes()
    assert kept == (source / "adapter_model.safetensors").read_bytes()
    facts = json.loads((run / "adapter-best" / "lorafit.json").read_text())  # a whole adapter: the recipe with it
    assert facts == json.loads((source / "lorafit.json").read_text()) and facts["extra"]["recipe"]["train"]["keep_best"]
    assert json.loads((run / "report.json").read_text())["eval"]["best"]["step"] == best_step


def test_improves_compares_accuracy_upward_and_loss_downward():
    assert improves({"loss": 1.0, "accuracy": 0.6}, {"loss": 0.5, "accuracy": 0.5})
    assert not improves({"loss": 0.1, "accuracy": 0.5}, {"loss": 0.5, "accuracy": 0.5})
    assert improves({"loss": 0.4}, {"loss": 0.5}) and not improves({"loss": 0.6}, {"loss": 0.5})
    assert improves({"loss": 9.0}, None)


def test_curves_png_is_a_valid_png(tracked):
    from PIL import Image

    path = tracked["tracked"] / "curves.png"
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(path) as image:
        image.verify()
        assert image.size[0] > 100 and image.size[1] > 100


def test_without_matplotlib_the_run_says_how_to_get_curves(tmp_path, monkeypatch):
    monkeypatch.setattr(curves, "pyplot", lambda: None)
    console = Console(record=True, width=200)
    assert curves.save_curves([{"step": 1, "loss": 1.0, "lr": 1e-3}], tmp_path / "curves.png", console) is False
    assert "pip install matplotlib" in console.export_text()
    assert not (tmp_path / "curves.png").exists()


def test_sparkline_runs_from_the_lowest_to_the_highest_bar():
    assert curves.sparkline([1.0, 2.0, 3.0]) == "▁▅█"
    assert len(curves.sparkline(list(range(100)), width=10)) == 10


@pytest.mark.parametrize(("train", "named"), [({"report_to": ["wandb"]}, "pip install wandb"),
                                              ({"keep_best": True}, "eval_every")])
def test_a_missing_tracker_or_keep_best_without_evaluations_is_refused(tiny_recipe, tmp_path, monkeypatch, train,
                                                                         named):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    result = runner.invoke(app, ["train", "--recipe", str(tiny_recipe(train=train))], terminal_width=400)
    assert named in assert_one_line_error(result)
    assert not (tmp_path / "run").exists()
