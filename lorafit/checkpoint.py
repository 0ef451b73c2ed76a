"""Training state for exact resume: LoRA weights, AdamW moments, schedule, RNG and data position.

Tensors go to safetensors and everything else to JSON, so nothing is ever read back with pickle.
A checkpoint folder is built under a temporary name and renamed, so any `step-NNNNNN` folder is complete.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorafit.errors import LorafitError
from lorafit.storage import staged_dir, write_json

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


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
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = state
    version, mt_state, gauss = random.getstate()
    numpy_state = np.random.get_state()
    plain = {
        "python": [version, list(mt_state), gauss],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }
    return plain, tensors


def restore_rng(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
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
    progress: dict,
    write_adapter,
) -> Path:
    """Write checkpoints/step-NNNNNN atomically. `write_adapter(folder)` adds the PEFT-format adapter."""
    trainable = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    optimizer_state = optimizer.state_dict()
    tensors = {f"model.{name}": t for name, t in trainable.items()}
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).contiguous()
    rng_plain, rng_tensors = capture_rng()
    tensors.update(rng_tensors)
    plain = {
        "step": step,
        "progress": progress,
        "param_groups": optimizer_state["param_groups"],
        "scheduler": scheduler.state_dict(),
        "rng": rng_plain,
    }
    final = checkpoint_dir(run_dir, step)
    with staged_dir(final) as folder:
        write_adapter(folder / "adapter")
        save_file({k: v.cpu() for k, v in tensors.items()}, str(folder / STATE_TENSORS))
        write_json(folder / STATE_JSON, plain)
    return final


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Put the model's LoRA weights, the optimizer, schedule and RNGs back; return the saved progress."""
    try:
        plain = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, ValueError, SafetensorError) as error:
        raise LorafitError(
            f"checkpoint {folder} is unreadable ({error}); delete it to resume from an earlier one"
        ) from error
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("model."):
                name = key.removeprefix("model.")
                if name not in parameters or parameters[name].shape != value.shape:
                    raise LorafitError(f"checkpoint {folder} does not fit this model ({name}); start a new run")
                parameters[name].copy_(value)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})
    scheduler.load_state_dict(plain["scheduler"])
    restore_rng(plain["rng"], tensors)
    return {"step": plain["step"], **plain["progress"]}
