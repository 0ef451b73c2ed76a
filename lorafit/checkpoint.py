"""Training state for exact resume: LoRA weights, AdamW moments, schedule, RNG and data position.

Tensors go to safetensors and everything else to JSON, so nothing is ever read back with pickle.
A checkpoint folder is built under a temporary name and renamed, so any `step-NNNNNN` folder is complete.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lorafit.errors import LorafitError
from lorafit.lora import whole
from lorafit.parallel import all_gather_objects, like
from lorafit.recipe import Recipe, changed_keys, load_recipe, resumable_keys, validate
from lorafit.storage import write_folder

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class RunState:
    """What a run has done so far, beyond the weights: saved in each checkpoint as training_state.json "progress"."""

    data_fingerprint: str
    global_batch: int = 0  # rows per optimizer step over all processes
    world_size: int = 1
    eval_before: dict | None = None
    tokens: int = 0
    train_seconds: float = 0.0
    model_fingerprint: str = ""  # lorafit.model.weights_fingerprint of the base ("" in older checkpoints)
    total_steps: int = 0  # the schedule's length when the checkpoint was saved (0 in older checkpoints)
    best: dict | None = None  # [train] keep_best: the best evaluation so far, with its step
    log_window: dict | None = None  # the log window open at the checkpoint (metrics.LogWindow.saved)


# Keys that set the schedule's length: a --resume may change them where `check_length` allows it.
LENGTH_KEYS = {"train.max_steps", "train.epochs"}


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
    if not resume:
        if report is not None:
            raise LorafitError(
                f"{run_dir} already holds a run, finished at step {report['throughput']['steps']}; to train it longer "
                "pass --resume --set train.max_steps=<more>, or give --output for a new run"
            )
        if latest is not None or (run_dir / "adapter").exists():
            where = f" (stopped after {latest.name})" if latest else ""
            raise LorafitError(f"{run_dir} already holds a run{where}; pass --resume to continue it or --output for a new one")
        return None
    if latest is None:
        if report is not None:
            raise LorafitError(
                f"{run_dir} finished without keeping its last step's training state (an older lorafit), so it cannot be "
                "extended exactly; start a new run with more steps"
            )
        raise LorafitError(f"{run_dir} has no complete checkpoint to resume from; drop --resume to start fresh")
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


def check_continuation(folder: Path, now: RunState, schedule: str, warmup_steps: int) -> None:
    """The rules that need the tokenized rows: the same training rows, and a schedule length that may change."""
    saved = read_progress(folder)
    if saved.data_fingerprint != now.data_fingerprint:
        raise LorafitError(
            f"the training rows differ from those {folder.parent.parent} started with (data file or tokenizer "
            "changed); restore them to resume, or start a new run"
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
    """The recipe `folder`'s adapter was trained with (its lorafit.json), else the run's recipe.toml."""
    facts = Path(folder) / "adapter" / "lorafit.json"
    try:
        raw = json.loads(facts.read_text())["extra"]["recipe"] if facts.is_file() else None
        if raw is None and (Path(run_dir) / "recipe.toml").is_file():
            return load_recipe(Path(run_dir) / "recipe.toml")
        if raw is None:
            raise ValueError("it records no recipe")
        return validate(raw, where=str(facts))
    except (OSError, ValueError, KeyError, TypeError, LorafitError) as error:
        raise unreadable(Path(folder), error) from error


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


def unreadable(folder: Path, error: object) -> LorafitError:
    return LorafitError(f"checkpoint {folder.name} is unreadable ({error}); remove it to resume from the one before")


def data_fingerprint(rows: list[dict]) -> str:
    """A hash of the tokenized training rows, so a resumed run can tell that its data changed underneath it."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row["input_ids"], row["labels"]]).encode())
    return digest.hexdigest()


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; half-written ones only ever exist under a hidden temporary name."""
    folder = Path(run_dir) / "checkpoints"
    steps = [(int(m.group(1)), p) for p in folder.glob("step-*") if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def remove_partial(run_dir: Path) -> None:
    """Delete checkpoint folders that a killed run left half-built under their temporary names."""
    for folder in (Path(run_dir) / "checkpoints").glob(".step-*.tmp"):
        shutil.rmtree(folder, ignore_errors=True)


def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    version, mt_state, gauss = random.getstate()
    numpy_state = np.random.get_state()
    plain = {
        "python": [version, list(mt_state), gauss],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }
    return plain, tensors


def restore_rng(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, mt_state, gauss = plain["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, *rest = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: RunState,
    adapter_files: dict[str, bytes],
    *,
    write: bool = True,
    scaler=None,
) -> Path:
    """Write checkpoints/step-NNNNNN atomically: `adapter_files` under adapter/, and the training state.

    Every process calls it (it gathers shards and each rank's RNG state); only the one with `write` writes.
    """
    from safetensors.torch import save

    tensors = {f"model.{name}": whole(p.detach()) for name, p in model.named_parameters() if p.requires_grad}
    optimizer_state = optimizer.state_dict()
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = whole(torch.as_tensor(value))
    rng_plain = []
    for rank, (plain, rng_tensors) in enumerate(all_gather_objects(capture_rng())):
        rng_plain.append(plain)
        tensors.update({f"rng.{rank}.{key}": value for key, value in rng_tensors.items()})
    final = checkpoint_dir(run_dir, step)
    if not write:
        return final
    plain = {
        "step": step,
        "progress": asdict(state),
        "param_groups": optimizer_state["param_groups"],
        "scheduler": scheduler.state_dict(),
        "grad_scaler": scaler.state_dict() if scaler is not None else None,  # fp16 loss scaling
        "rng": rng_plain,
    }
    files = {f"adapter/{name}": data for name, data in adapter_files.items()}
    files[STATE_TENSORS] = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    files[STATE_JSON] = (json.dumps(plain, indent=2, default=str) + "\n").encode()
    write_folder(final, files)
    return final


def _read_state(folder: Path, tensors: bool = False) -> dict:
    """training_state.json (and, with `tensors`, the safetensors file under key "tensors")."""
    try:
        plain = json.loads((folder / STATE_JSON).read_text())
        if not isinstance(plain, dict):
            raise ValueError(f"{STATE_JSON} is not a JSON object")
        if tensors:
            plain["tensors"] = load_file(str(folder / STATE_TENSORS))
    except (OSError, ValueError, SafetensorError) as error:
        raise unreadable(folder, error) from error
    return plain


def read_progress(folder: Path) -> RunState:
    """The RunState a checkpoint recorded."""
    try:
        return RunState(**_read_state(folder)["progress"])
    except (KeyError, TypeError) as error:
        raise unreadable(folder, f"training_state.json has no valid progress: {error}") from error


def checkpoint_step(folder: Path) -> int:
    step = _read_state(folder).get("step")
    if not isinstance(step, int) or step < 1:
        raise unreadable(folder, f"training_state.json has no valid step ({step!r})")
    return step


def verify(folder: Path, trainable: dict[str, tuple[int, ...]]) -> None:
    """Check, from the files' headers alone, that a checkpoint holds every trainable tensor with its shape and
    the state of the optimizer, schedule and RNG, before any weight is loaded."""
    from safetensors import safe_open

    plain = _read_state(folder)
    read_progress(folder)
    checkpoint_step(folder)
    try:
        with safe_open(str(folder / STATE_TENSORS), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (OSError, SafetensorError) as error:
        raise unreadable(folder, error) from error
    for index, (name, shape) in enumerate(trainable.items()):
        for key in (f"model.{name}", f"optimizer.{index}.exp_avg", f"optimizer.{index}.exp_avg_sq"):
            if key not in shapes:
                raise unreadable(folder, f"tensor {key} is missing")
            if shapes[key] != shape:
                raise LorafitError(
                    f"checkpoint {folder.name} does not fit this model ({name} is {list(shapes[key])}, the model's "
                    f"{list(shape)}); start a new run"
                )
    problems = [key for key in ("param_groups", "scheduler", "rng") if not plain.get(key)]
    if problems or "rng.0.torch" not in shapes:
        raise unreadable(folder, f"no {(problems or ['rng.0.torch'])[0]} state")


def load_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, rank: int = 0, scaler=None
) -> tuple[int, RunState]:
    """Put the LoRA weights, the optimizer, schedule and this rank's RNGs back; return the step and the run state.

    Tensors are saved whole, so a run resumes on any number of processes: each takes its shard of them.
    """
    plain = _read_state(folder, tensors=True)
    try:
        return _restore(folder, plain, model, optimizer, scheduler, rank, scaler)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise unreadable(folder, f"{type(error).__name__}: {error}") from error


def _restore(folder: Path, plain: dict, model: nn.Module, optimizer, scheduler, rank: int, scaler) -> tuple[int, RunState]:
    tensors = plain.pop("tensors")
    parameters = dict(model.named_parameters())
    missing = [name for name, p in parameters.items() if p.requires_grad and f"model.{name}" not in tensors]
    if missing:
        raise unreadable(folder, f"tensor model.{missing[0]} is missing")
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("model."):
                name = key.removeprefix("model.")
                if name not in parameters or tuple(parameters[name].shape) != tuple(value.shape):
                    raise LorafitError(f"checkpoint {folder} does not fit this model ({name}); start a new run")
                parameters[name].copy_(like(value, parameters[name]))
    by_index = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            param = by_index[int(index)]
            state.setdefault(int(index), {})[name] = value if value.ndim == 0 else like(value, param)
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})
    scheduler.load_state_dict(plain["scheduler"])
    if scaler is not None and plain.get("grad_scaler"):
        scaler.load_state_dict(plain["grad_scaler"])
    saved_ranks = len(plain["rng"])
    mine = rank if rank < saved_ranks else 0  # more processes than before: the new ones take rank 0's
    restore_rng(plain["rng"][mine], {k.removeprefix(f"rng.{mine}."): v for k, v in tensors.items()
                                     if k.startswith(f"rng.{mine}.")})
    return plain["step"], RunState(**plain["progress"])
