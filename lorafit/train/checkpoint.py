"""Training state for exact resume: LoRA weights, AdamW moments, schedule, RNG and data position.

Tensors go to safetensors and everything else to JSON, so nothing is ever read back with pickle.
A checkpoint folder is built under a temporary name and renamed, so any `step-NNNNNN` folder is complete.
"""
from __future__ import annotations

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
from lorafit.lora.linear import whole
from lorafit.storage import json_text, write_folder
from lorafit.train.processes import all_gather_objects, like

STATE_TENSORS = "training_state.safetensors"


STATE_JSON = "training_state.json"


STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class RunState:
    """What a run has done so far, beyond the weights: saved in each checkpoint as training_state.json "progress"."""

    data_fingerprint: str  # lorafit.data.plan.TrainingPlan.fingerprint of the training rows
    global_batch: int = 0  # rows per optimizer step over all processes
    world_size: int = 1
    eval_before: dict | None = None
    tokens: int = 0
    train_seconds: float = 0.0
    model_fingerprint: str = ""  # lorafit.model.load.weights_fingerprint of the base ("" in older checkpoints)
    total_steps: int = 0  # the schedule's length when the checkpoint was saved (0 in older checkpoints)
    best: dict | None = None  # [train] keep_best: the best evaluation so far, with its step
    log_window: dict | None = None  # the log window open at the checkpoint (metrics.LogWindow.saved)
    eval_fingerprint: str = ""  # data_fingerprint of the evaluation rows the run started with ("" in older ones)


# The dtypes a checkpoint's trainable tensors and optimizer moments are written in (an optimizer's step count is
# any float); anything else was not written by lorafit, and loading it would round the run silently.
WRITTEN_DTYPE = "F32"


FLOAT_DTYPES = ("F64", "F32", "BF16", "F16")


def unreadable(folder: Path, error: object) -> LorafitError:
    return LorafitError(f"checkpoint {folder.name} is unreadable ({error}); remove it to resume from the one before")


def diverged(run_dir: Path, what: str) -> LorafitError:
    """A run whose loss or weights stopped being finite (exit 1). No checkpoint is saved after that (and none
    that is not finite is resumed from), so the newest one is good."""
    last = latest_checkpoint(run_dir)
    kept = f"; the last good checkpoint is {last.name}" if last else ""
    return LorafitError(f"{what}; lower [train] lr or use float32{kept}", exit_code=1)


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
    broken = next((key for key, value in tensors.items() if not torch.isfinite(value).all()), None)
    if broken is not None:  # every rank holds the same whole tensors, so every rank stops here
        raise diverged(run_dir, f"{broken} became NaN or inf at step {step}")
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
    files[STATE_JSON] = json_text(plain).encode()
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
    """The step a checkpoint recorded, which must be the one its folder is named after."""
    step = _read_state(folder).get("step")
    if not isinstance(step, int) or step < 1:
        raise unreadable(folder, f"training_state.json has no valid step ({step!r})")
    named = STEP_DIR.match(folder.name)
    if named and int(named.group(1)) != step:
        raise unreadable(folder, f"training_state.json says step {step}, its folder's name step {int(named.group(1))}")
    return step


def verify(folder: Path, trainable: dict[str, tuple[int, ...]]) -> None:
    """Check that a checkpoint holds every trainable tensor with its shape, as float32 and finite, the optimizer's
    moments likewise, a step that fits its name and schedule, and the schedule and RNG states, before any weight
    of the model is loaded. The tensors are read one at a time (LoRA's are small)."""
    from safetensors import safe_open

    plain = _read_state(folder)
    progress = read_progress(folder)
    step = checkpoint_step(folder)
    if progress.total_steps and step > progress.total_steps:
        raise unreadable(folder, f"its step {step} is past the end of its {progress.total_steps}-step schedule")
    try:
        with safe_open(str(folder / STATE_TENSORS), framework="pt") as handle:
            headers = {key: handle.get_slice(key) for key in handle.keys()}
            shapes = {key: tuple(header.get_shape()) for key, header in headers.items()}
            for index, (name, shape) in enumerate(trainable.items()):
                for key in (f"model.{name}", f"optimizer.{index}.exp_avg", f"optimizer.{index}.exp_avg_sq"):
                    if key not in shapes:
                        raise unreadable(folder, f"tensor {key} is missing")
                    if shapes[key] != shape:
                        raise LorafitError(
                            f"checkpoint {folder.name} does not fit this model ({name} is {list(shapes[key])}, the "
                            f"model's {list(shape)}); start a new run"
                        )
            for key, header in headers.items():
                if key.startswith(("model.", "optimizer.")):
                    _check_tensor(folder, key, header.get_dtype(), handle.get_tensor(key))
    except (OSError, SafetensorError) as error:
        raise unreadable(folder, error) from error
    problems = [key for key in ("param_groups", "scheduler", "rng") if not plain.get(key)]
    if problems or "rng.0.torch" not in shapes:
        raise unreadable(folder, f"no {(problems or ['rng.0.torch'])[0]} state")


def _check_tensor(folder: Path, key: str, dtype: str, tensor: torch.Tensor) -> None:
    """A trainable tensor or optimizer moment as lorafit writes it: float32 and finite (second moments >= 0)."""
    step_count = key.endswith(".step")
    if dtype not in (FLOAT_DTYPES if step_count else (WRITTEN_DTYPE,)):
        raise unreadable(folder, f"tensor {key} is {dtype}, where lorafit writes {'a float' if step_count else 'F32'}")
    if not torch.isfinite(tensor).all():
        raise unreadable(folder, f"tensor {key} holds NaN or inf")
    if key.endswith("exp_avg_sq") and (tensor < 0).any():
        raise unreadable(folder, f"tensor {key} holds negative second moments")


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
