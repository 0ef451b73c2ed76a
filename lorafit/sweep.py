"""`lorafit sweep`: one training run per value of a recipe key (the LoRA rank by default), then one table.

Each run is an ordinary run folder inside the sweep folder, trained by its own `lorafit train` process, so
its peak memory is its own and an interrupted sweep resumes like a run: finished runs (report.json written)
are kept, an interrupted one continues from its newest checkpoint, the rest start fresh. The sweep folder
follows the run folder's rules (lorafit.train.run_folder): new, empty or a marked sweep, locked while it runs.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from lorafit.errors import LorafitError
from lorafit.messages import note
from lorafit.recipe import Recipe, changed_keys, load_recipe, resumable_keys
from lorafit.report.curves import MISSING, pyplot, save_figure
from lorafit.storage import write_json
from lorafit.train.checkpoint import latest_checkpoint
from lorafit.train.metrics import eval_metric
from lorafit.train.resume import not_resumable
from lorafit.train.run_folder import RunLock, check_output, mark


def run_folder_name(key: str, value: str) -> str:
    """`lora.rank`, `8` -> `rank-8`; a list value such as ["q","v"] -> `targets-q_v`."""
    return f"{key.split('.')[-1]}-{re.sub(r'[^A-Za-z0-9.+-]+', '_', value).strip('_') or 'empty'}"


def plan_sweep(recipe_path: Path, key: str, values: list[str], overrides: list[str], output: Path | None):
    """(sweep folder, [(value, run folder, --set list, recipe)]): every value's recipe validated before any run."""
    if not values:
        raise LorafitError("the sweep has no values; give e.g. --ranks 1,2,4,8 or --key lora.alpha --values 8,16")
    base = load_recipe(recipe_path, overrides)
    folder = Path(output).resolve() if output else Path(base.output.dir + "-sweep")
    runs = []
    for value in values:
        run_dir = folder / run_folder_name(key, value)
        settings = [*overrides, f"{key}={value}", f"output.dir={json.dumps(str(run_dir))}"]
        runs.append((value, run_dir, settings, load_recipe(recipe_path, settings)))
    names = [run_dir.name for _, run_dir, _, _ in runs]
    if len(set(names)) != len(names):
        raise LorafitError(f"the values of {key} repeat ({', '.join(values)}); give each value once")
    check_output(str(folder), base.model.name, kind="sweep")
    for value, run_dir, _, recipe in runs:  # each run's own folder rules, and one that cannot go on, before any run
        check_output(str(run_dir), recipe.model.name)
        if not (run_dir / "report.json").is_file() and latest_checkpoint(run_dir) and not_resumable(recipe):
            raise LorafitError(dead_end(key, value, run_dir, recipe))
    return folder, runs


def dead_end(key: str, value: str, run_dir: Path, recipe: Recipe) -> str:
    return (f"the {key} = {value} run in {run_dir} was interrupted, and {not_resumable(recipe)}; delete that folder "
            "and run the same command again: finished runs are kept")


def sweep(recipe_path: Path, key: str, values: list[str], *, overrides: list[str] = (), output: Path | None = None,
          console: Console | None = None, train_output=None) -> dict:
    """Train (or keep, or resume) one run per value; write sweep.json and sweep.png; return the table's rows."""
    console = console or Console(stderr=True)
    folder, runs = plan_sweep(recipe_path, key, values, list(overrides), output)
    lock = RunLock(folder, kind="sweep")
    try:
        mark(folder, "sweep")
        for value, run_dir, settings, recipe in runs:
            if (run_dir / "report.json").is_file():
                check_unchanged(run_dir, recipe)
                console.print(f"[bold]{escape(key)} = {escape(value)}[/]: finished in {escape(str(run_dir))}, kept",
                              highlight=False)
                continue
            resume = latest_checkpoint(run_dir) is not None
            console.print(f"[bold]{escape(key)} = {escape(value)}[/]: {'resuming' if resume else 'training'} in "
                          f"{escape(str(run_dir))}", highlight=False)
            code = train_one(recipe_path, settings, resume, stdout=train_output)
            if code == 130:
                how = dead_end(key, value, run_dir, recipe) if not_resumable(recipe) else (
                    f"the sweep stopped during {key} = {value}; run the same command again to continue it")
                raise LorafitError(how, exit_code=130)
            if code:
                raise LorafitError(f"the {key} = {value} run failed (exit {code}, see above); fix it and run the "
                                   "sweep again: finished runs are kept", exit_code=code if code == 2 else 1)
        rows = [table_row(recipe_value(recipe, key, value), run_dir) for value, run_dir, _, recipe in runs]
        result = {"key": key, "folder": str(folder), "metric": rows[0]["metric"], "runs": rows}
        write_json(folder / "sweep.json", result)
        if not save_sweep_plot(result, folder / "sweep.png"):
            note(MISSING.format(what="sweep.png"), console)
    finally:
        lock.release()
    return result


def check_unchanged(run_dir: Path, recipe: Recipe) -> None:
    """A finished run is only reused when it was trained with this recipe (keys that change results)."""
    saved = run_dir / "recipe.toml"
    changed = changed_keys(load_recipe(saved), recipe) - resumable_keys() if saved.is_file() else set()
    if changed:
        raise LorafitError(f"{run_dir} was trained with a different {sorted(changed)[0]}; give the sweep another "
                           "--output, or restore the recipe")


def train_one(recipe_path: Path, settings: list[str], resume: bool, stdout=None) -> int:
    """`lorafit train` in a process of its own, its exit code; its one-line errors and progress reach the terminal
    as they are. It runs in a session of its own, so a Ctrl-C or SIGTERM reaches it once, through the sweep: it
    then stops after its step and saves a checkpoint, as a run does."""
    command = [sys.executable, "-m", "lorafit", "train", "--recipe", str(recipe_path)]
    for setting in settings:
        command += ["--set", setting]
    if resume:
        command.append("--resume")
    child = subprocess.Popen(command, stdout=stdout, start_new_session=True)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGTERM)


def recipe_value(recipe: Recipe, key: str, given: str):
    """The value of `key` as the recipe holds it (8, not "8"; ["q", "v"]), for sweep.json; `given` where the
    recipe holds none (a sub-table the variant does not read)."""
    value = recipe.model_dump()
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return given
        value = value[part]
    return value


def shown(value) -> str:
    """A swept value as the table and the plot show it: 8, or a list as ["q", "v"]."""
    return value if isinstance(value, str) else json.dumps(value)


def table_row(value, run_dir: Path) -> dict:
    """One run's line of the sweep table, from its report.json."""
    report = json.loads((run_dir / "report.json").read_text())
    evaluation = report["eval"]
    metric, after, higher = eval_metric(evaluation)
    earlier = evaluation.get("before")  # the base model's scores, unless they were on other rows (a resume's note)
    before = eval_metric(earlier)[1] if earlier and not earlier.get("rows_changed") else None
    gained = None if before is None else (after - before if higher else before - after)
    return {
        "value": value,
        "dir": str(run_dir),
        "trainable_params": report["trainable_params"],
        "adapter_bytes": report["adapter_bytes"],
        "eval_loss": evaluation["loss"],
        "eval_accuracy": evaluation.get("accuracy"),
        "metric": metric,
        "metric_gained": gained,  # accuracy gained, or loss lost, against the base model
        "gained_per_million_params": None if gained is None else gained / (report["trainable_params"] / 1e6),
        "train_s": report["throughput"]["wall_s"],
        "peak_bytes": report["memory"]["peak_bytes"],
    }


def sweep_table(result: dict):
    from rich.table import Table

    from lorafit.report.tables import human_bytes

    name = result["key"].split(".")[-1]
    gained = "accuracy gained" if result["metric"] == "accuracy" else "loss drop"
    table = Table(title=escape(f"sweep over {result['key']}: {result['folder']}"))
    for column in (name, "trainable", "adapter", "eval loss", "accuracy", "time", "peak memory", f"{gained} / M params"):
        table.add_column(column, justify="right")
    for row in result["runs"]:
        accuracy, per_million = row["eval_accuracy"], row["gained_per_million_params"]
        table.add_row(escape(shown(row["value"])), f"{row['trainable_params']:,}", human_bytes(row["adapter_bytes"]),
                      f"{row['eval_loss']:.4f}", "" if accuracy is None else f"{accuracy:.4f}", f"{row['train_s']:.1f} s",
                      human_bytes(row["peak_bytes"]), "" if per_million is None else f"{per_million:+.3f}")
    return table


def save_sweep_plot(result: dict, path: Path) -> bool:
    """The eval metric and the metric gained per million trainable parameters, against the swept value."""
    plt = pyplot()
    if plt is None:
        return False
    runs, metric = result["runs"], result["metric"]
    labels = [shown(row["value"]) for row in runs]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    left.plot(labels, [row[f"eval_{metric}"] for row in runs], marker="o", label="after training")
    first = runs[0]
    if first["metric_gained"] is not None:  # every run starts from the same base model
        base = first[f"eval_{metric}"] - first["metric_gained"] * (1 if metric == "accuracy" else -1)
        left.axhline(base, linestyle="--", color="gray", label="base model")
    left.legend()
    left.set_title(f"eval {metric}")
    right.bar(labels, [row["gained_per_million_params"] or 0.0 for row in runs])
    right.set_title(f"{'accuracy gained' if metric == 'accuracy' else 'loss drop'} per million trainable params")
    for axis in (left, right):
        axis.set_xlabel(result["key"])
        axis.grid(alpha=0.3)
    save_figure(figure, path)
    plt.close(figure)
    return True
