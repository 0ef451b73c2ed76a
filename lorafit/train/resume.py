"""What an existing run folder allows: a fresh start, a resume from its newest checkpoint, or nothing (finished);
and the recipe a resume continues with, the run's own.

Every rule compares what the checkpoint recorded (its recipe, base-weight fingerprint, global batch, data
fingerprint, schedule length) with this launch, and refuses with one line that says what to restore.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from lorafit.data.plan import FINGERPRINT_PREFIX
from lorafit.errors import LorafitError
from lorafit.lora.variants import VARIANTS
from lorafit.recipe import Recipe, changed_keys, load_recipe, override_table, resumable_keys, validate, with_overrides
from lorafit.train.checkpoint import RunState, checkpoint_step, latest_checkpoint, read_progress, unreadable

# Keys that set the schedule's length: a --resume may change them where `check_length` allows it.
LENGTH_KEYS = {"train.max_steps", "train.epochs"}


def train_recipe(recipe_path: Path | None, overrides: list[str], resume: bool) -> tuple[Recipe, list[str]]:
    """The recipe `train` runs and what a resume changes in it: the run's own with --resume (resume_recipe), else
    the file's."""
    if resume:
        return resume_recipe(recipe_path, overrides)
    if recipe_path is None:
        raise LorafitError("give --recipe PATH, or --resume --output DIR to continue a run; see lorafit train --help")
    return load_recipe(recipe_path, overrides), []


def resume_recipe(recipe_path: Path | None, overrides: list[str]) -> tuple[Recipe, list[str]]:
    """The recipe `train --resume` continues with: the run's own (the one its newest checkpoint recorded), with
    the changes `--recipe` and `--set` make to it; and a line for each change, to print once the checks that need
    the data have passed (a refused run prints nothing on stdout).

    A value of the file or of --set that differs from the run's is a change: keys marked resumable may change;
    the schedule's length only by --set (a file's other max_steps is more likely another version of the recipe
    than a wish to train longer), and then as `check_length` allows; any other key is refused.
    """
    given = override_table(overrides)
    from_file = load_recipe(recipe_path, overrides) if recipe_path is not None else None
    run_dir = given.get("output", {}).get("dir", from_file.output.dir if from_file else None)
    if not isinstance(run_dir, str) or not run_dir.strip():
        raise LorafitError("--resume without --recipe needs the run folder; give it as --output DIR")
    saved = run_recipe(Path(run_dir))
    if saved is None:
        if from_file is not None:
            return from_file, []  # check_resume says what the folder holds instead
        raise LorafitError(f"{run_dir} holds no lorafit run to resume; start one with --recipe PATH --output "
                           f"{shown_path(run_dir)} (without --resume)")
    raw = saved.model_dump(exclude_none=True)
    raw["output"]["dir"] = run_dir  # where the run is now
    recipe = from_file or with_overrides(raw, overrides, where=f"{run_dir}'s recipe")
    by_set = {f"{section}.{key}" for section in given for key in given[section]}
    before, after = saved.model_dump(), recipe.model_dump()
    changes = []
    for key in sorted(changed_keys(saved, recipe) - {"output.dir"}):  # all checked before any is printed
        section, name = key.split(".")
        changes.append((key, json.dumps(before[section][name]), json.dumps(after[section][name]),
                        "--set" if key in by_set else str(recipe_path)))
        _check_change(*changes[-1], run_dir)
    return recipe, [f"resume changes {key}: {old} -> {new} (from {source})" for key, old, new, source in changes]


def _check_change(key: str, old: str, new: str, source: str, run_dir: str) -> None:
    """Refuse a change that a resume cannot make, or that only --set may ask for (values as TOML writes them)."""
    continue_as_started = f"drop --recipe to continue with the run's own recipe ({continue_command(run_dir)})"
    if key in LENGTH_KEYS and source != "--set":
        raise LorafitError(
            f"{source} gives {key} = {new}, and the run in {run_dir} was started with {old}; "
            f"{continue_as_started}, or to train it to that length pass --set {key}={new}"
        )
    if key not in LENGTH_KEYS | resumable_keys():
        why = "a resume cannot change it (it changes what the steps compute)"
        if source == "--set":
            raise LorafitError(f"--set {key}: {why}; drop it, or give another --output for a new run")
        raise LorafitError(f"{source} gives {key} = {new} where the run in {run_dir} has {old}, and {why}; "
                           f"{continue_as_started}, or give another --output for a new run")


def run_recipe(run_dir: Path) -> Recipe | None:
    """The recipe of the run in `run_dir`: its newest checkpoint's, else its recipe.toml; None for a folder
    without either."""
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        return checkpoint_recipe(latest, run_dir)
    if (run_dir / "recipe.toml").is_file():
        return load_recipe(run_dir / "recipe.toml")
    return None


def continue_command(run_dir: str | Path) -> str:
    """The command that continues the run in `run_dir`, to copy and paste."""
    return f"lorafit train --resume -o {shlex.quote(shown_path(run_dir))}"


def shown_path(path: str | Path) -> str:
    """`path` relative to the current folder when it lies inside it, else as it is."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def check_resume(run_dir: Path, recipe: Recipe, resume: bool, now: RunState) -> Path | None:
    """Every rule about an existing run folder that needs no tokenized data: the checkpoint to resume from, or None.

    A fresh run never overwrites a finished or interrupted one; --resume refuses a recipe that changed a key
    that matters against the one the checkpoint itself recorded (keys marked resumable may change, and the
    schedule's length within `check_length`), base weights that changed, and a different global batch
    (the number of processes may change, the rows of a step may not). `now.data_fingerprint` is not used:
    `check_continuation` compares it once the data is tokenized.
    """
    latest = latest_checkpoint(run_dir)
    report = _finished_report(run_dir)
    if not resume and report is not None:
        raise LorafitError(
            f"{run_dir} already holds a run, finished at step {report['throughput']['steps']}; to train it longer: "
            f"{continue_command(run_dir)} --set train.max_steps=<more>, or give --output for a new run"
        )
    if latest is None:
        if report is not None:
            raise LorafitError(
                f"{run_dir} finished without keeping its last step's training state (an older lorafit), so it cannot be "
                "extended exactly; start a new run with more steps"
            )
        if (run_dir / "adapter").exists():  # the same words with or without --resume: neither can continue it
            raise LorafitError(f"{run_dir} holds an adapter but no checkpoint to continue from; give --output for a "
                               "new run")
        if resume:
            raise LorafitError(f"{run_dir} has no complete checkpoint to resume from; drop --resume to start fresh")
        return None
    reason = not_resumable(recipe)
    if reason:
        raise LorafitError(f"{run_dir} holds a run stopped after {latest.name}, and {reason}; give --output for a new run")
    if not resume:
        raise LorafitError(f"{run_dir} already holds a run (stopped after {latest.name}); continue it with "
                           f"{continue_command(run_dir)}, or give --output for a new one")
    _check_recipe(checkpoint_recipe(latest, run_dir), recipe, LENGTH_KEYS)
    saved = read_progress(latest)
    if saved.model_fingerprint and now.model_fingerprint and saved.model_fingerprint != now.model_fingerprint:
        raise LorafitError(
            f"the base model's weights ({recipe.model.name}) differ from those {run_dir} started with; restore them "
            "to resume, or start a new run"
        )
    if saved.global_batch and saved.global_batch != now.global_batch:
        raise LorafitError(
            f"{run_dir} ran with a global batch of {saved.global_batch} rows ({saved.world_size} "
            f"processes) and this launch gives {now.global_batch}; keep batch_size × grad_accum × processes the "
            "same, e.g. set [train] global_batch"
        )
    return latest


def not_resumable(recipe: Recipe) -> str | None:
    """Why a run of `recipe` cannot be continued from its checkpoints, or None when it can."""
    return VARIANTS[recipe.lora.variant].resume_refusal or None


def saved_state(run_dir: Path, recipe: Recipe) -> str:
    """What a run that stopped or failed leaves to continue from, and how, in words for its last line."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return "nothing to resume"
    return f"the newest checkpoint is {latest.name}, {how_to_continue(recipe)}"


def how_to_continue(recipe: Recipe) -> str:
    reason = not_resumable(recipe)
    if reason:
        return f"but {reason}; start a new run with another --output"
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    launch = f" (launched as before, on {processes} processes)" if processes > 1 else ""
    return f"continue with: {continue_command(recipe.output.dir)}{launch}"


def finished_report(run_dir: Path, recipe: Recipe) -> dict | None:
    """The report of a finished run that `recipe` would not train any further (same length keys), else None."""
    report = _finished_report(run_dir)
    if report is None:
        return None
    saved = checkpoint_recipe(run_dir, run_dir)  # the final adapter/ records the recipe it was trained with
    if changed_keys(saved, recipe) & LENGTH_KEYS:
        return None
    _check_recipe(saved, recipe)
    return report


def eval_rows_changed(saved: RunState, now: RunState) -> bool:
    """Whether the evaluation rows differ from those the run started with (unknown in older checkpoints: no)."""
    return bool(saved.eval_fingerprint and now.eval_fingerprint and saved.eval_fingerprint != now.eval_fingerprint)


def check_continuation(folder: Path, now: RunState, schedule: str, warmup_steps: int) -> None:
    """The rules that need the tokenized rows: the same training rows, and a schedule length that may change."""
    saved = read_progress(folder)
    if not saved.data_fingerprint.startswith(FINGERPRINT_PREFIX):
        raise LorafitError(f"{folder.parent.parent} was saved by an older lorafit, whose hash of the training rows "
                           "this one cannot check; finish it with that version, or start a new run")
    if saved.data_fingerprint != now.data_fingerprint:
        raise LorafitError(
            f"the training rows differ from those {folder.parent.parent} started with (data file or tokenizer "
            "changed, or under [data] streaming the max_steps that sets the rows drawn); restore them to resume, "
            "or start a new run"
        )
    check_length(checkpoint_step(folder), saved.total_steps, now.total_steps, schedule, warmup_steps)


def check_length(step: int, before: int, after: int, schedule: str, warmup_steps: int) -> None:
    """A run may train to a new step count when every step it has taken had the learning rate it would now have.

    The constant schedule's rate does not depend on the length, nor does any schedule's during warmup; after
    warmup a decaying schedule's rate at every step does, so its steps so far would not be those of one run.
    """
    if after == before:
        return
    key = "train.max_steps (or train.epochs)"
    if not before:
        raise LorafitError(f"{key} changed, and this checkpoint predates extending runs; restore it to resume")
    if after < step:
        raise LorafitError(f"{key} gives {after} steps but the run is at step {step}; give at least {step}")
    if schedule != "constant" and step > warmup_steps:
        raise LorafitError(
            f"{key} changed from {before} to {after} steps, but the {schedule} schedule's learning rate after warmup "
            f"depends on the step count, so the {step} steps taken would not be those of one run of {after}; "
            "restore it to resume, or start a new run (schedule = 'constant' runs can be extended)"
        )


def checkpoint_recipe(folder: Path, run_dir: Path) -> Recipe:
    """The recipe `folder`'s adapter was trained with (its lorafit.json), else the run's recipe.toml. `folder` is
    a checkpoint, or the run folder itself for its final adapter."""
    facts = Path(folder) / "adapter" / "lorafit.json"
    try:
        raw = json.loads(facts.read_text())["extra"]["recipe"] if facts.is_file() else None
        if raw is None and (Path(run_dir) / "recipe.toml").is_file():
            return load_recipe(Path(run_dir) / "recipe.toml")
        if raw is None:
            raise ValueError("it records no recipe")
        return validate(raw, where=str(facts))
    except (OSError, ValueError, KeyError, TypeError, LorafitError) as error:
        if Path(folder) != Path(run_dir):
            raise unreadable(Path(folder), error) from error
        latest = latest_checkpoint(run_dir)
        copy = f"copy it back from {latest / 'adapter'}" if latest else "restore it"
        raise LorafitError(f"the final adapter's {facts} is unreadable ({error}); {copy} to go on with the run") from error


def _check_recipe(saved: Recipe, recipe: Recipe, allowed: set[str] = frozenset()) -> None:
    changed = changed_keys(saved, recipe) - resumable_keys() - allowed
    if changed:
        key = sorted(changed)[0]
        raise LorafitError(f"recipe key {key} changed since the run started; restore it to resume, or start a new run")


def _finished_report(run_dir: Path) -> dict | None:
    """report.json of a run whose final adapter and report were both written, else None."""
    path = Path(run_dir) / "report.json"
    if not (path.is_file() and (Path(run_dir) / "adapter").is_dir()):
        return None
    try:
        report = json.loads(path.read_text())
        report["throughput"]["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return report
