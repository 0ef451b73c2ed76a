"""Parameter counts, memory estimates and throughput, as JSON-ready dicts and as rich tables."""

from __future__ import annotations

import resource

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from lorafit.inject import count_parameters, inject_lora, lora_layers
from lorafit.lora import LoRALinear
from lorafit.model import DTYPES, load_config, meta_model

ADAM_STATE_BYTES = 8  # AdamW keeps two fp32 moments per trained parameter
LORA_BYTES = 4  # A and B are always kept in fp32


def module_rows(layers: dict[str, LoRALinear]) -> list[dict]:
    return [
        {"name": path, "shape": list(layer.weight_shape), "lora_params": layer.lora_params}
        for path, layer in layers.items()
    ]


def adapter_tensor_bytes(layers: dict[str, LoRALinear]) -> int:
    """Bytes of the tensors in adapter_model.safetensors, where a sliced layer's B is stored full-width."""
    total = 0
    for layer in layers.values():
        stacked_rank, d_in = layer.lora_A.shape
        d_out, _ = layer.weight_shape
        total += stacked_rank * (d_in + d_out) * LORA_BYTES
    return total


def memory_estimate(total: int, trainable: int, weight_bytes: int) -> dict:
    """Static training memory in bytes: weights + gradients + AdamW states. Activations are not counted."""
    base = total - trainable
    lora = {
        "weights": base * weight_bytes + trainable * LORA_BYTES,
        "gradients": trainable * LORA_BYTES,
        "optimizer": trainable * ADAM_STATE_BYTES,
    }
    # Full fine-tuning trains the base model itself: the LoRA parameters would not exist.
    full = {
        "weights": base * weight_bytes,
        "gradients": base * weight_bytes,
        "optimizer": base * ADAM_STATE_BYTES,
    }
    lora["total"] = sum(lora.values())
    full["total"] = sum(full.values())
    return {
        "lora_estimate": lora,
        "full_finetune_estimate": full,
        "counted": "weights, gradients and AdamW states; not activations, buffers or framework overhead",
    }


def parameter_report(model: nn.Module, layers: dict[str, LoRALinear], weight_bytes: int) -> dict:
    counts = count_parameters(model)
    return {
        "total_params": counts.total,
        "trainable_params": counts.trainable,
        "trainable_ratio": counts.ratio,
        "adapter_bytes": adapter_tensor_bytes(layers),
        "modules": module_rows(layers),
        "memory": memory_estimate(counts.total, counts.trainable, weight_bytes),
    }


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "peak_kind": "CUDA allocator peak"}
    # Linux reports ru_maxrss in KiB.
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_kind": "process peak RSS"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def run_report(recipe, model: nn.Module, device: torch.device, steps: int, state, eval_after: dict, adapter_bytes: int) -> dict:
    """report.json: parameters, memory, throughput and evaluation of a finished run."""
    report = parameter_report(model, lora_layers(model), DTYPES[recipe.model.dtype].itemsize)
    report["adapter_bytes"] = adapter_bytes
    report["memory"] = {**peak_memory(device), **report["memory"]}
    seconds = state.train_seconds
    report["throughput"] = {"tokens_per_s": state.tokens / seconds if seconds else 0.0, "steps": steps, "wall_s": seconds}
    report["eval"] = {**eval_after, "before": state.eval_before}
    report["device"] = device_name(device)
    report["mixed_precision"] = recipe.train.mixed_precision
    return report


def describe(model_name: str, rank: int, alpha: float, targets: list[str], dtype: str = "float32") -> dict:
    """What LoRA on `targets` would train, computed on the meta device: only config.json is read."""
    config = load_config(model_name)
    model = meta_model(config)
    layers = inject_lora(model, targets, rank, alpha)
    report = parameter_report(model, layers, DTYPES[dtype].itemsize)
    report["model"] = model_name
    report["model_type"] = config.model_type
    report["lora"] = {"rank": rank, "alpha": alpha, "targets": targets}
    return report


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def info_tables(report: dict) -> list:
    """Rich renderables for `lorafit info` and the end-of-training summary."""
    from rich.table import Table

    modules = Table(title=f"LoRA targets (rank {report['lora']['rank']}, alpha {report['lora']['alpha']:g})")
    for column in ("module", "shape (d_out x d_in)", "LoRA params"):
        modules.add_column(column, justify="right" if column != "module" else "left")
    rows = report["modules"]
    shown = rows if len(rows) <= 12 else rows[:6] + [None] + rows[-3:]
    for row in shown:
        if row is None:
            modules.add_row(f"... {len(rows) - 9} more", "", "")
        else:
            modules.add_row(row["name"], " x ".join(map(str, row["shape"])), f"{row['lora_params']:,}")
    modules.add_row(f"[bold]{len(rows)} modules", "", f"[bold]{report['trainable_params']:,}")

    totals = Table(title="Parameters and memory", show_header=False)
    totals.add_column(justify="left")
    totals.add_column(justify="right")
    totals.add_row("trainable", f"{report['trainable_params']:,}")
    totals.add_row("total", f"{report['total_params']:,}")
    totals.add_row("trainable ratio", f"{report['trainable_ratio']:.4%}")
    totals.add_row("adapter on disk", human_bytes(report["adapter_bytes"]))
    memory = report["memory"]
    for name, key in (("LoRA", "lora_estimate"), ("full fine-tuning", "full_finetune_estimate")):
        parts = memory[key]
        detail = ", ".join(f"{k} {human_bytes(parts[k])}" for k in ("weights", "gradients", "optimizer"))
        totals.add_row(f"{name} memory (est.)", f"{human_bytes(parts['total'])}  [dim]({detail})")
    totals.caption = f"Estimates count {memory['counted']}."
    return [modules, totals]


def eval_table(result: dict, title: str = "Evaluation"):
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    for key in ("loss", "perplexity", "accuracy"):
        if key in result:
            table.add_row(key, f"{result[key]:.4f}")
    table.add_row("examples", f"{result['examples']:,}")
    return table


def summary_tables(report: dict, run_dir) -> list:
    """The end-of-run box: what was trained, how fast, how much memory, and how it scores."""
    from rich.table import Table

    table = Table(title=f"lorafit run: {run_dir}", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    table.add_row("trainable / total params", f"{report['trainable_params']:,} / {report['total_params']:,} ({report['trainable_ratio']:.3%})")
    table.add_row("adapter on disk", human_bytes(report["adapter_bytes"]))
    throughput = report["throughput"]
    table.add_row("steps", f"{throughput['steps']:,} in {throughput['wall_s']:.1f} s")
    table.add_row("throughput", f"{throughput['tokens_per_s']:,.0f} tokens/s")
    memory = report["memory"]
    table.add_row(f"peak memory ({memory['peak_kind']})", human_bytes(memory["peak_bytes"]))
    table.add_row(
        "static estimate LoRA / full FT",
        f"{human_bytes(memory['lora_estimate']['total'])} / {human_bytes(memory['full_finetune_estimate']['total'])}",
    )
    evaluation = report["eval"]
    before = evaluation.get("before") or {}
    for key in ("loss", "perplexity", "accuracy"):
        if key in evaluation:
            was = f"{before[key]:.4f} -> " if key in before else ""
            table.add_row(f"eval {key}", f"{was}{evaluation[key]:.4f}")
    table.add_row("device", report["device"])
    return [table]


def print_dropped(console: Console, name: str, split) -> None:
    if split.dropped:
        console.print(
            f"[yellow]note:[/] {split.dropped} of {split.total} rows in {name!r} lost all supervised tokens to "
            "\\[data] max_length and were left out"
        )


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=console.quiet,
    )


def print_eval(console: Console, when: str, result: dict) -> None:
    accuracy = f"  accuracy {result['accuracy']:.3f}" if "accuracy" in result else ""
    console.print(
        f"eval {when}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}{accuracy}  ({result['examples']} examples)"
    )
