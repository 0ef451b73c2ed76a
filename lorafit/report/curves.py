"""Pictures of a run: curves.png (loss, learning rate, evaluation against step) and a terminal sparkline.

matplotlib is an optional extra (`pip install 'lorafit[plots]'`); without it a run says how to get the
picture and finishes all the same.
"""
from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from lorafit.messages import note
from lorafit.storage import write_atomic

BARS = "▁▂▃▄▅▆▇█"


MISSING = "install matplotlib for {what}: pip install matplotlib (or pip install 'lorafit[plots]')"


def sparkline(values: list[float], width: int = 40) -> str:
    """`values` as one line of block characters, lowest to highest, averaged down to at most `width` bars."""
    if not values:
        return ""
    if len(values) > width:  # equal-sized buckets, each bar their mean
        edges = [round(i * len(values) / width) for i in range(width + 1)]
        values = [sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:])]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(BARS[round((v - low) / span * (len(BARS) - 1))] for v in values)


def loss_sparkline(history: list[dict], width: int = 24) -> str:
    """The training loss of metrics.jsonl lines: its first and last log windows (each the mean over the steps it
    names) over a sparkline of them all, "" without any; a single window says that it is the only one."""
    lines = [line for line in history if "loss" in line]
    if not lines:
        return ""
    first = f"{log_window(0, lines[0]['step'])}: {lines[0]['loss']:.4f}"
    if len(lines) == 1:
        return f"{first} (the only log window)"
    last = f"{log_window(lines[-2]['step'], lines[-1]['step'])}: {lines[-1]['loss']:.4f}"
    return f"{first} -> {last}\n{sparkline([line['loss'] for line in lines], width)}"


def log_window(previous: int, step: int) -> str:
    """The steps a metrics line's means are over: those after the previous line's step, up to its own."""
    return f"step {step}" if step == previous + 1 else f"steps {previous + 1}-{step}"


def pyplot():
    """matplotlib's pyplot drawing to files only (no window), or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> None:
    """Render to memory, then write atomically, so a half-drawn PNG never appears under `path`."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    figure.clf()
    write_atomic(path, buffer.getvalue())


def save_curves(history: list[dict], path: Path, console: Console) -> bool:
    """Draw training loss, learning rate and (when scored during training) the eval metric against step."""
    plt = pyplot()
    if plt is None:
        note(MISSING.format(what=Path(path).name), console)
        return False
    train = [line for line in history if "loss" in line]
    scored = [line for line in history if "eval_loss" in line]
    panels = [("training loss", train, "loss"), ("learning rate", train, "lr")]
    if scored:
        metric = "eval_accuracy" if "eval_accuracy" in scored[0] else "eval_loss"
        panels.append((metric.replace("_", " "), scored, metric))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, layout="constrained")
    for axis, (title, lines, key) in zip(axes[0], panels):
        axis.plot([line["step"] for line in lines], [line[key] for line in lines], marker="o" if len(lines) < 30 else None)
        axis.set_title(title if len(lines) != 1 else f"{title}: one point (step {lines[0]['step']})")
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    figure.suptitle(Path(path).parent.name)
    save_figure(figure, path)
    plt.close(figure)
    return True
