"""The loss's shape as the end table and curves.png show it: first and last log windows, and a lone point said."""

from __future__ import annotations

from rich.console import Console

import lorafit.report.curves
from lorafit.report.curves import loss_sparkline, save_curves


def lines(*pairs: tuple[int, float]) -> list[dict]:
    return [{"step": step, "loss": loss, "lr": 1e-3} for step, loss in pairs]


def test_the_loss_row_names_the_steps_of_its_first_and_last_log_windows():
    history = lines((10, 2.5), (20, 1.5), (25, 0.75)) + [{"step": 25, "eval_loss": 0.5}]
    assert loss_sparkline(history) == "steps 1-10: 2.5000 -> steps 21-25: 0.7500\n█▄▁"  # highest, middle, lowest


def test_a_single_log_window_says_it_is_the_only_one():
    assert loss_sparkline(lines((5, 5.8546))) == "steps 1-5: 5.8546 (the only log window)"
    assert loss_sparkline(lines((1, 2.0), (2, 1.0))).startswith("step 1: 2.0000 -> step 2: 1.0000\n")
    assert loss_sparkline([]) == ""


def test_curves_with_one_point_say_so_in_the_panel_titles(tmp_path, monkeypatch):
    drawn = {}

    def keep_titles(figure, path):
        drawn[path] = [axis.get_title() for axis in figure.axes]

    monkeypatch.setattr(lorafit.report.curves, "save_figure", keep_titles)
    save_curves(lines((5, 5.8546)), tmp_path / "one.png", Console(quiet=True))
    save_curves(lines((5, 2.0), (10, 1.0)), tmp_path / "two.png", Console(quiet=True))
    assert drawn[tmp_path / "one.png"] == ["training loss: one point (step 5)", "learning rate: one point (step 5)"]
    assert drawn[tmp_path / "two.png"] == ["training loss", "learning rate"]
