"""Throughput, model FLOPs per token and MFU, measured peak memory, and report.json as a whole."""

from __future__ import annotations

import math
import re
import resource

import torch
from torch import nn

from lorafit import __version__
from lorafit.lora.linear import LoRALinear, projection_shape
from lorafit.model.inject import is_projection, lora_layers, stores_transposed
from lorafit.model.load import DTYPES
from lorafit.model.quantize import frozen_weight_bytes, quantized_summary
from lorafit.report.counts import parameter_report

# Dense bf16 tensor-core peaks in TFLOP/s (NVIDIA's datasheets, the sparsity figures halved); the first key found
# in the device name as a whole word wins (specific names first), so "L40" is not read as "L4".
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200 NVL": 835.0,
    "GH200": 989.0,
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
}


def peak_memory(device: torch.device) -> dict:
    """The training steps' peak (the CUDA counters are reset when the steps start), the largest over processes."""
    from lorafit.train.processes import all_max

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
               *, precision: tuple[str, str], flops_per_token: float, processes: int = 1) -> dict:
    """report.json: parameters, memory, throughput (tokens/s of all `processes`; achieved TFLOP/s and MFU per
    device, where the device's peak is known or [train] peak_tflops gives it) and evaluation."""
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
                            **throughput_figures(flops_per_token, tokens_per_s,
                                                 device_peak_flops(device, recipe.train.peak_tflops), processes)}
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
    Model FLOPs, not work done: q/v slices of a fused projection run B with zero blocks, and a plain step skips the
    input gradient of the first block's projections below every adapter. tests/report/test_throughput.py checks
    the rest against torch's FlopCounterMode on a real step.
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
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return tflops * 1e12, f"{key} dense bf16 peak, {tflops:g} TFLOP/s"
    return None, f"no known bf16 peak for {name!r}; give it as [train] peak_tflops"


def device_peak_flops(device: torch.device, given_tflops: float = 0.0) -> tuple[float | None, str]:
    """The peak MFU is measured against: `given_tflops` ([train] peak_tflops) where set, else the table's for a
    CUDA device; none is claimed for CPUs, whose peak depends on cores and clocks."""
    if given_tflops:
        return given_tflops * 1e12, f"[train] peak_tflops = {given_tflops:g}"
    if device.type == "cuda":
        return peak_for_name(torch.cuda.get_device_name(device))
    return None, f"no known peak for {device.type.upper()}; give it as [train] peak_tflops"


def throughput_figures(flops_per_token: float, tokens_per_s: float, peak: tuple[float | None, str],
                       processes: int = 1) -> dict:
    """FLOPs per token, and achieved TFLOP/s and MFU per device (None without a known peak) when `processes`
    devices together trained `tokens_per_s`; `peak` (one device's) as device_peak_flops gives it."""
    peak_flops, source = peak
    achieved = flops_per_token * tokens_per_s / processes
    return {
        "model_flops_per_token": flops_per_token,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peak_flops if peak_flops else None,
        "peak_tflops": peak_flops / 1e12 if peak_flops else None,
        "peak_source": source,
        "devices": processes,
    }
