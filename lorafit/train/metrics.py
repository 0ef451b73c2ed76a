"""What a run records as it goes: metrics.jsonl (the built-in record) and accelerate's trackers.

A log line holds the MEAN of the steps since the previous one (loss, grad norm), so it does not depend on
which step happened to land on the log step, and every rank computes the same numbers from all-reduced sums.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.recipe import GENERATION_METRICS, Recipe, TrainSection
from lorafit.storage import append_line, write_atomic
from lorafit.train.processes import all_sum

PROJECT = "lorafit"  # the project name the trackers file runs under (wandb, mlflow, trackio)


TRACKERS = {  # report_to name -> (pip package, accelerate's check that it is importable)
    "tensorboard": ("tensorboard", "is_tensorboard_available"),
    "wandb": ("wandb", "is_wandb_available"),
    "mlflow": ("mlflow", "is_mlflow_available"),
    "trackio": ("trackio", "is_trackio_available"),
}


def check_settings(settings: TrainSection) -> None:
    """Refuse, before any work, trackers that are not installed.

    accelerate itself silently skips a tracker whose package is missing; a run the user asked to track must not.
    """
    import accelerate.utils

    for name in settings.report_to:
        package, available = TRACKERS[name]
        if not getattr(accelerate.utils, available)():
            raise LorafitError(f"[train] report_to = {name!r} needs the {package} package: pip install {package}")


def tracker_options(settings: TrainSection, run_dir: Path) -> dict:
    """Accelerator keywords for the recipe's trackers; the local ones (TensorBoard) write under <run>/logs."""
    if not settings.report_to:
        return {}
    return {"log_with": list(settings.report_to), "project_dir": str(Path(run_dir) / "logs")}


def start_trackers(accelerator, recipe: Recipe) -> None:
    """Open the trackers (main process only, as accelerate does) with the recipe as the run's configuration."""
    if not accelerator.log_with:
        return
    name = Path(recipe.output.dir).name
    config = {f"{section}.{key}": value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
              for section, keys in recipe.model_dump(exclude_none=True).items() for key, value in keys.items()}
    names = {"wandb": {"name": name}, "trackio": {"name": name}, "mlflow": {"run_name": name}}
    accelerator.init_trackers(PROJECT, config=config, init_kwargs=names)


def stop_trackers(accelerator) -> None:
    """Flush and close the trackers; not accelerator.end_training(), which would also end the process group."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()


def log(accelerator, run_dir: Path, record: dict) -> None:
    """One line of metrics.jsonl and the same values to the trackers ("train/loss", "eval/accuracy", ...)."""
    if not accelerator.is_main_process:
        return
    append_line(Path(run_dir) / "metrics.jsonl", json.dumps(record))
    values = {}
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
            section, _, name = key.partition("_") if key.startswith("eval_") else ("train", "", key)
            values[f"{section}/{name}"] = value
    accelerator.log(values, step=record["step"])


def read_metrics(run_dir: Path, upto: int | None = None) -> list[dict]:
    """The lines of metrics.jsonl (those of steps up to `upto` when given)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [m for m in lines if upto is None or m["step"] <= upto]


def restart_metrics(accelerator, run_dir: Path, upto: int) -> None:
    """Keep the lines up to the step a run (re)starts from: later ones belong to steps that run again."""
    if accelerator.is_main_process:
        kept = read_metrics(run_dir, upto) if upto else []
        write_atomic(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept))


def eval_record(step: int, result: dict) -> dict:
    return {"step": step, **{f"eval_{key}": value for key, value in result.items() if key != "before"}}


def eval_metric(result: dict) -> tuple[str, float, bool]:
    """(name, value, higher is better) of the number keep_best and a sweep compare: accuracy if scored, else the
    first of [eval] metrics (results hold them in the recipe's order), else loss."""
    if "accuracy" in result:
        return "accuracy", result["accuracy"], True
    generated = next((key for key in result if key in GENERATION_METRICS), None)
    if generated is not None:
        return generated, result[generated], True
    return "loss", result["loss"], False


def improves(result: dict, best: dict | None) -> bool:
    if best is None:
        return True
    _, new, higher = eval_metric(result)
    _, old, _ = eval_metric(best)
    return new > old if higher else new < old


class LogWindow:
    """Sums over the steps since the last log line, kept on the device so adding to them never waits for it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)
        self.steps, self.tokens, self.start = 0, 0, time.perf_counter()
        self.summed = 0.0  # the loss sum over ranks, as last read by mean_loss

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, tokens: int) -> None:
        """`loss` is this rank's part of the step's loss; `grad_norm` the norm of the whole gradient (or None)."""
        self.loss += loss
        if grad_norm is not None:
            full = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
            self.grad_norm += full.to(self.device, torch.float32)
        self.steps += 1
        self.tokens += tokens

    def mean_loss(self) -> float:
        """The window's mean step loss over all ranks: the one read of the loss from the device."""
        self.summed = all_sum([self.loss.item()], self.device)[0]
        return self.summed / max(self.steps, 1)

    def saved(self) -> dict:
        """The open window for a checkpoint (call after mean_loss), so a resumed run logs what this one would."""
        return {"loss": self.summed, "grad_norm": self.grad_norm.item(), "steps": self.steps}

    def restore(self, saved: dict | None, main: bool) -> None:
        """Reopen a checkpoint's window; its loss sum is already over all ranks, so only the main one adds it."""
        if saved:
            self.steps = saved["steps"]
            self.grad_norm += saved["grad_norm"]
            if main:
                self.loss += saved["loss"]

    def record(self, step: int, loss: float, lr: float, *, clipped: bool) -> dict:
        """The metrics.jsonl line for the window ending at `step` (every rank calls it); starts the next window."""
        from lorafit.report.throughput import peak_memory

        line = {"step": step, "loss": loss, "lr": lr,
                "tokens_per_s": self.tokens / max(time.perf_counter() - self.start, 1e-9)}
        if clipped:  # the norm is only computed where the gradient is clipped
            line["grad_norm"] = self.grad_norm.item() / max(self.steps, 1)
        line["memory_bytes"] = peak_memory(self.device)["peak_bytes"]  # so far, the largest over processes
        self.reset()
        return line
