"""Parameter counts, memory estimates and throughput, as JSON-ready dicts and as rich tables."""

from __future__ import annotations

import math
import resource

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from lorafit import __version__
from lorafit.inject import count_parameters, inject_lora, is_projection, lora_layers, stores_transposed
from lorafit.lora import LoRALinear, projection_shape
from lorafit.model import DTYPES, decoder_blocks, load_config, meta_model, resolve_precision
from lorafit.quantize import frozen_weight_bytes, quantized_summary

ADAM_STATE_BYTES = 8  # AdamW keeps two fp32 moments per trained parameter
LORA_BYTES = 4  # A and B are always kept in fp32
# Dense bf16 tensor-core peaks in TFLOP/s; the first key found in the device name wins (specific names first).
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "GH200": 989.0,
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


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
        if hasattr(layer, "lora_magnitude"):
            total += d_out * LORA_BYTES  # DoRA's magnitude vector, stored over every output row
    return total


def memory_estimate(total: int, trainable: int, weight_bytes: int, frozen_bytes: int | None = None) -> dict:
    """Static training memory in bytes: weights + gradients + AdamW states. Activations are not counted.

    `frozen_bytes` is the frozen weights' real size when some are 4-bit; full fine-tuning is always full precision.
    """
    base = total - trainable
    lora = {
        "weights": (base * weight_bytes if frozen_bytes is None else frozen_bytes) + trainable * LORA_BYTES,
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


def parameter_report(
    model: nn.Module, layers: dict[str, LoRALinear], weight_bytes: int, frozen_bytes: int | None = None
) -> dict:
    counts = count_parameters(model)
    return {
        "total_params": counts.total,
        "trainable_params": counts.trainable,
        "trainable_ratio": counts.ratio,
        "adapter_bytes": adapter_tensor_bytes(layers),
        "modules": module_rows(layers),
        "memory": memory_estimate(counts.total, counts.trainable, weight_bytes, frozen_bytes),
    }


def peak_memory(device: torch.device) -> dict:
    """The training steps' peak (the CUDA counters are reset when the steps start), the largest over processes."""
    from lorafit.parallel import all_max

    if device.type == "cuda":
        allocated, reserved = all_max(
            [torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)], device
        )
        return {"peak_bytes": int(allocated), "peak_reserved_bytes": int(reserved),
                "peak_kind": "CUDA allocator peak of the training steps"}
    # Linux reports ru_maxrss in KiB; the process's peak since it started, loading included.
    (rss,) = all_max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024], device)
    return {"peak_bytes": int(rss), "peak_kind": "process peak RSS"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def run_report(recipe, model: nn.Module, device: torch.device, steps: int, state, eval_after: dict, adapter_bytes: int,
               *, precision: tuple[str, str], flops_per_token: float) -> dict:
    """report.json: parameters, memory, throughput (with MFU where the device's peak is known) and evaluation."""
    weights, mixed_precision = precision
    quantized = recipe.model.quantize != "none"
    frozen = frozen_weight_bytes(model) if quantized else None
    report = parameter_report(model, lora_layers(model), DTYPES[weights].itemsize, frozen)
    if quantized:
        report["quantize"] = quantized_summary(model)
    report["adapter_bytes"] = adapter_bytes
    report["memory"] = {**peak_memory(device), **report["memory"]}
    seconds = state.train_seconds
    tokens_per_s = state.tokens / seconds if seconds else 0.0
    report["throughput"] = {"tokens_per_s": tokens_per_s, "steps": steps, "wall_s": seconds,
                            **throughput_figures(flops_per_token, tokens_per_s, device_peak_flops(device))}
    report["eval"] = {**eval_after, "before": state.eval_before}
    report["device"] = device_name(device)
    report["dtype"], report["mixed_precision"] = weights, mixed_precision
    report["lorafit_version"] = __version__
    return report


def model_dims(config) -> dict[str, int]:
    """Layers, heads, head size, width and vocabulary from a config, in GPT-2 or Llama naming."""
    def first(*names: str) -> int:
        return next(getattr(config, n) for n in names if getattr(config, n, None) is not None)

    hidden = first("hidden_size", "n_embd")
    heads = first("num_attention_heads", "n_head")
    return {
        "layers": first("num_hidden_layers", "n_layer"),
        "heads": heads,
        "head_dim": getattr(config, "head_dim", None) or hidden // heads,
        "hidden": hidden,
        "vocab": config.vocab_size,
    }


def frozen_trunk_params(model: nn.Module) -> int:
    """Weights of the frozen projections a token passes through: every linear / Conv1D (a LoRA layer's base
    included) except the output head. Embeddings, norms and biases do no matmul and are not counted."""
    head = model.get_output_embeddings()
    skip = {id(head), id(getattr(head, "base", None))}
    total = 0
    for module in model.modules():
        if isinstance(module, LoRALinear):
            skip.add(id(module.base))  # counted here, through the wrapper
            if id(module) not in skip:
                total += math.prod(module.weight_shape)
        elif is_projection(module) and id(module) not in skip:
            total += math.prod(projection_shape(module, stores_transposed(module)))
    return total


def training_flops_per_token(
    model: nn.Module, layers: dict[str, LoRALinear], *, seq_len: int, supervised_fraction: float
) -> float:
    """Model FLOPs per trained token of a LoRA step (multiply-add = 2 FLOPs; recomputation is not counted).

    PaLM's convention (Chowdhery et al. 2022, appendix B) for full training is 6N + 12·L·H·Q·T: a forward of
    2N + 4·L·H·Q·T (QKᵀ and AV, 2·T·H·Q each per layer) and a backward of twice that. With LoRA:
    - frozen trunk, 4·N: forward 2N + gradient w.r.t. activations 2N; no weight gradient (the 6N's last 2N).
    - attention, 12·L·H·Q·T: QKᵀ and AV have no weights, so their backward is all activation gradients
      (dQ and dK, dA and dV), still twice the forward; freezing changes nothing here. T = seq_len, the
      length attention runs over, not halved for the causal mask (PaLM's convention); H·Q = heads × head_dim.
    - output head, 4·d·V on the supervised fraction of positions only: lorafit runs it only where labels are.
    - LoRA matmuls, 6 × their parameter count: they train, so forward, activation and weight gradients.
    """
    if not 0.0 <= supervised_fraction <= 1.0:
        raise ValueError(f"supervised_fraction must be in [0, 1], got {supervised_fraction}")
    dims = model_dims(model.config)
    head = model.get_output_embeddings()
    head_params = math.prod(head.weight_shape if isinstance(head, LoRALinear) else projection_shape(head))
    attention = 12 * dims["layers"] * dims["heads"] * dims["head_dim"] * seq_len
    lora = 6 * sum(layer.lora_params for layer in layers.values())
    return 4 * frozen_trunk_params(model) + attention + 4 * head_params * supervised_fraction + lora


def peak_for_name(name: str) -> tuple[float | None, str]:
    """(dense bf16 peak in FLOP/s, which entry gave it) for a device name; (None, why) when none matches."""
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"{key} dense bf16 peak, {tflops:g} TFLOP/s"
    return None, f"no known bf16 peak for {name!r}"


def device_peak_flops(device: torch.device) -> tuple[float | None, str]:
    """The peak MFU is measured against; none is claimed for CPUs, whose peak depends on cores and clocks."""
    if device.type == "cuda":
        return peak_for_name(torch.cuda.get_device_name(device))
    return None, f"no known peak for {device.type.upper()}"


def throughput_figures(flops_per_token: float, tokens_per_s: float, peak: tuple[float | None, str]) -> dict:
    """FLOPs per token, achieved TFLOP/s and MFU (None without a known peak); `peak` as device_peak_flops gives it."""
    peak_flops, source = peak
    achieved = flops_per_token * tokens_per_s
    return {
        "model_flops_per_token": flops_per_token,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peak_flops if peak_flops else None,
        "peak_tflops": peak_flops / 1e12 if peak_flops else None,
        "peak_source": source,
    }


def describe(
    model_name: str, rank: int, alpha: float, targets: list[str], dtype: str = "auto", variant: str = "lora",
    quantize: str = "none",
) -> dict:
    """What LoRA on `targets` would train, computed on the meta device: only config.json is read."""
    config = load_config(model_name)
    model = meta_model(config)
    # AdaLoRA is counted as the plain LoRA it exports at this rank (its Λ and init_rank pairs are not counted)
    layers = inject_lora(model, targets, rank, alpha, variant="lora" if variant == "adalora" else variant)
    weights = resolve_precision("auto", "auto")[0] if dtype == "auto" else dtype  # as training here would load it
    itemsize = DTYPES[weights].itemsize
    frozen = None
    if quantize != "none":
        frozen = frozen_weight_bytes(model, planned=decoder_blocks(model), itemsize=itemsize)
    report = parameter_report(model, layers, itemsize, frozen)
    if quantize != "none":
        report["quantize"] = quantize
    report["model"] = model_name
    report["model_type"] = config.model_type
    report["dtype"] = weights
    report["lora"] = {"rank": rank, "alpha": alpha, "targets": targets, "variant": variant}
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

    variant = {"lora": "LoRA", "dora": "DoRA"}.get(report["lora"].get("variant", "lora"), "LoRA")
    modules = Table(title=f"{variant} targets (rank {report['lora']['rank']}, alpha {report['lora']['alpha']:g})")
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


def summary_tables(report: dict, run_dir, loss_curve: str = "") -> list:
    """The end-of-run box: what was trained, how fast, how much memory, and how it scores (and the loss's shape)."""
    from rich.table import Table

    table = Table(title=f"lorafit run: {run_dir}", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    table.add_row("trainable / total params", f"{report['trainable_params']:,} / {report['total_params']:,} ({report['trainable_ratio']:.3%})")
    table.add_row("adapter on disk", human_bytes(report["adapter_bytes"]))
    throughput = report["throughput"]
    table.add_row("steps", f"{throughput['steps']:,} in {throughput['wall_s']:.1f} s")
    table.add_row("throughput", f"{throughput['tokens_per_s']:,.0f} tokens/s")
    mfu = throughput.get("mfu")
    of_peak = f" = {mfu:.1%} MFU of {throughput['peak_tflops']:g}" if mfu is not None else ""
    table.add_row("model FLOP/s", f"{throughput.get('achieved_tflops', 0.0):.3g} TFLOP/s{of_peak}")
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
    if "skipped" in evaluation:
        table.add_row("eval", f"none: {evaluation['skipped']}")
    if loss_curve:
        table.add_row("training loss", loss_curve)
    table.add_row("device", report["device"])
    return [table]


def print_fitting(console: Console, split) -> None:
    """A split's rows shortened, cut, split into windows or left out, when there are any."""
    from lorafit.messages import note

    text = split.note()
    if text:
        note(text, console)


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
    if "skipped" in result:
        return  # said once, when the data was read
    accuracy = f"  accuracy {result['accuracy']:.3f}" if "accuracy" in result else ""
    console.print(
        f"eval {when}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}{accuracy}  ({result['examples']} examples)"
    )
