"""`make bench`: lorafit's training step side by side with peft + a plain AdamW loop, and full fine-tuning.

The three methods train copies of one randomly initialised GPT-2-small-shaped model on the same synthetic
rows, one measured step of each in turn (lorafit, peft, full, lorafit, ...), so that noise from other
work on the machine falls on all three alike. Peak memory is measured per method in a fresh child process.
Job p trains the shipped tiny recipe as 1 process and as 2 (torchrun) on the same global batch; job k trains
the same completion rows padded and packed (bench/packing_job.py); job r compares lorafit's accuracy with peft's on
a real pretrained model and a real data set (bench/parity_job.py). Jobs l and m are GPU-sized (a 1B-class
Llama at 2,048 tokens, GPT-2-medium on the SST-2-style job; `make gpu-check` runs them) and compare lorafit
with peft only; `--json` ends the output with one line of the ratios that matter.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import peft
import torch
import transformers
from accelerate import Accelerator
from data_job import data_markdown, data_table, run_data
from packing_job import packing_markdown, packing_table, run_packing
from parity_job import SEEDS as PARITY_SEEDS
from parity_job import STEPS as PARITY_STEPS
from parity_job import parity_markdown, parity_table, run_parity
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lorafit.data.batches import collate
from lorafit.data.plan import StepRows
from lorafit.model.loss import SupervisedLoss
from lorafit.recipe import LoraSection, TrainSection
from lorafit.report.throughput import peak_for_name, training_flops_per_token
from lorafit.train.optimizer import build_optimizer
from lorafit.train.step import prepare_model, train_step

SEED = 0
RANK, ALPHA, DROPOUT = 8, 16, 0.05
LR_LORA, LR_FULL = 2e-4, 2e-5
MAX_GRAD_NORM = 1.0  # lorafit's recipe default; the plain loops clip too, so every method does the same work
LOSS_TOLERANCE = 1e-4  # relative, first-step loss of lorafit vs peft vs full (fp32, dropout off)
BF16_LOSS_TOLERANCE = 1e-2  # the same on a GPU, where every method runs on bf16 weights
NO_LOSS = -100  # the label transformers' loss ignores
RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("lorafit", "peft", "full")
LABELS = {"lorafit": "lorafit LoRA q,v", "peft": "peft LoRA c_attn", "full": "full fine-tuning"}
# peft's LoRA targets for the same projections lorafit adapts as q and v: (modules, weights stored [in, out]).
PEFT_TARGETS = {"gpt2": (["c_attn"], True), "llama": (["q_proj", "v_proj"], False)}
NOTES = [
    (
        "peft's target c_attn adapts q, k and v (the usual peft setup for GPT-2) with one rank-8 pair on the fused "
        "projection; lorafit gives the q rows and the v rows of c_attn a rank-8 pair each and leaves k alone. Both "
        "train 4·r·d parameters per layer."
    ),
    (
        "peft and full fine-tuning use a plain loop: shuffled batches padded to the longest row, forward with "
        "labels= (transformers' loss over the full logits), backward, clip to 1.0, torch.optim.AdamW with its "
        "default implementation. lorafit runs lorafit.train.step.train_step on its length-grouped batches."
    ),
    (
        "Both see the same measured rows; lorafit groups them by length only among those rows (a real epoch "
        "groups among 50 batches), so its padding saving here is if anything understated."
    ),
    "tokens/s counts non-padding input tokens; step times include collating the batch.",
    (
        "Model FLOPs per token are lorafit.report.throughput.training_flops_per_token's (as in report.json: 4·N for the frozen "
        "projections, the attention term, the head on supervised positions only, 6·the LoRA parameters) for both "
        "LoRA methods, which do the same useful work; full fine-tuning adds 2·N of weight gradients. On a GPU "
        "every method runs on bf16 weights under bf16 autocast (LoRA weights fp32), lorafit's default there."
    ),
    (
        "Steps alternate lorafit, peft, full per round, so a noisy neighbour on the machine slows all three alike; "
        "timings on a shared machine still vary from run to run."
    ),
]


# --------------------------------------------------------------------------- jobs and data


@dataclass(frozen=True)
class Job:
    """One workload: `classification` puts the loss on the label token only, `text` on every token."""

    key: str
    title: str
    task: str
    batch_size: int
    max_length: int
    targets: dict[str, float]  # ratio key -> target (tokens_per_s and mfu at least, the others at most)
    model: str = "gpt2-small"
    methods: tuple[str, ...] = METHODS


def define_jobs(quick: bool, gpu: bool) -> dict[str, Job]:
    return {
        "a": Job("a", "SST-2-style classification", "classification", 16, 128,
                 {"tokens_per_s": 1.5 if gpu else 1.3, "memory": 0.75}),
        "b": Job("b", "language modelling, every token supervised", "text", 4, 128 if quick else 512,
                 {"step_time": 0.70, "memory": 0.75}),
        "l": Job("l", "1B-class Llama, language modelling", "text", 4, 128 if quick else 2048,
                 {"tokens_per_s": 2.0, "memory": 0.6, "mfu": 0.35}, "llama-1b", ("lorafit", "peft")),
        "m": Job("m", "GPT-2-medium, SST-2-style classification", "classification", 16, 128, {}, "gpt2-medium",
                 ("lorafit", "peft")),
    }


def model_config(job: Job, quick: bool):
    """The job's model shape (random weights are enough to time it), or a tiny one of its family for a smoke test."""
    if job.model == "llama-1b":
        if quick:
            return LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096,
                               bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
        # Llama-3.2-1B's shape: 1.24B parameters with a 128k vocabulary whose head is the tied embedding.
        return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                           rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=True)
    if quick:
        return GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1024, n_positions=512, bos_token_id=1023,
                          eos_token_id=1023)
    if job.model == "gpt2-medium":
        return GPT2Config(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024)
    return GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)


def make_rows(job: Job, vocab: int, count: int, pool: str) -> list[dict]:
    """Synthetic token rows, deterministic for (job, pool): ids stand in for text, lengths are what matter."""
    rng = random.Random(f"lorafit-bench:{job.key}:{pool}")
    if job.task == "text":
        rows = [[rng.randrange(vocab) for _ in range(job.max_length)] for _ in range(count)]
        return [{"input_ids": ids, "labels": list(ids)} for ids in rows]
    template = random.Random("lorafit-bench:template")
    prefix = [template.randrange(vocab) for _ in range(2)]  # "Review:"
    suffix = [template.randrange(vocab) for _ in range(4)]  # "\nSentiment:"
    label_ids = [template.randrange(vocab) for _ in range(2)]  # " negative", " positive"
    rows = []
    for _ in range(count):
        prompt = prefix + [rng.randrange(vocab) for _ in range(review_tokens(rng, job.max_length - 7))] + suffix
        label = rng.choice(label_ids)
        rows.append({"input_ids": prompt + [label], "labels": [NO_LOSS] * len(prompt) + [label]})
    return rows


def review_tokens(rng: random.Random, most: int) -> int:
    """Review length in tokens: lognormal words like SST-2 sentences (median 19, ~3-70), 1.3 tokens a word."""
    words = min(max(rng.lognormvariate(math.log(19), 0.6), 3), 70)
    return min(math.ceil(words * 1.3), most)


def pad_batch(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """What DataCollatorWithPadding does for causal LM rows: right-pad to the longest, labels -100 there."""
    longest = max(len(row["input_ids"]) for row in rows)
    padding = [longest - len(row["input_ids"]) for row in rows]
    return {
        "input_ids": torch.tensor([row["input_ids"] + [pad_id] * n for row, n in zip(rows, padding)]),
        "attention_mask": torch.tensor([[1] * len(row["input_ids"]) + [0] * n for row, n in zip(rows, padding)]),
        "labels": torch.tensor([row["labels"] + [NO_LOSS] * n for row, n in zip(rows, padding)]),
    }


def shuffled_batches(rows: list[dict], batch_size: int) -> list[list[int]]:
    order = list(range(len(rows)))
    random.Random(SEED).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def lorafit_batches(rows: list[dict], batch_size: int) -> list[list[int]]:
    """The batches lorafit's training loop would form from these rows (length-grouped, shuffled)."""
    plan = StepRows([len(row["input_ids"]) for row in rows], batch_size, SEED)
    return [plan.rows(step) for step in range(plan.steps_per_epoch)]


def worst_case_batch(rows: list[dict], batch_size: int) -> list[int]:
    """The longest rows: padded to the longest, the batch that sets an epoch's memory peak for every method."""
    return sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]), reverse=True)[:batch_size]


# --------------------------------------------------------------------------- the three methods


@dataclass
class Method:
    """A model with its training step: `step(rows)` trains on one batch and returns (loss, input tokens)."""

    key: str
    model: nn.Module
    step: Callable[[list[dict]], tuple[float, int]]
    arrange: Callable[[list[dict], int], list[list[int]]]
    first_loss: Callable[[dict], float]
    trainable: int
    layers: dict | None = None  # lorafit's LoRA layers, for the model FLOPs


def build_method(key: str, base: nn.Module, device: torch.device, accelerator_factory, compile: bool = False) -> Method:
    if key == "lorafit":
        return build_lorafit(base, device, accelerator_factory(), compile)
    return build_plain(key, base, device)


def build_lorafit(model: nn.Module, device: torch.device, accelerator, compile: bool) -> Method:
    """LoRA on q and v (r=8, alpha=16, dropout 0.05), set up and trained by lorafit.train's own functions."""
    layers = prepare_model(model, LoraSection(rank=RANK, alpha=ALPHA, dropout=DROPOUT, targets=["q", "v"]),
                           compile=compile)
    settings = TrainSection(lr=LR_LORA, schedule="constant", max_grad_norm=MAX_GRAD_NORM, seed=SEED)
    optimizer, scheduler = build_optimizer(model, settings, total_steps=1)
    scorer, optimizer = accelerator.prepare(SupervisedLoss(model), optimizer)
    pad_id = model.config.eos_token_id
    steps = iter(range(1 << 62))

    def step(rows: list[dict]) -> tuple[float, int]:
        # Dropout keyed by (step, row) as in training; the bench's rows have no data-set index, so their place.
        batch = {**collate(rows, pad_id), "rows": list(range(len(rows)))}
        loss, _ = train_step(accelerator, scorer, optimizer, scheduler, [batch], step=next(steps),
                             max_grad_norm=MAX_GRAD_NORM, layers=layers.values(), seed=SEED)
        return loss.item(), sum(len(row["input_ids"]) for row in rows)  # read every step, as the plain loops do

    def first_loss(batch: dict) -> float:
        batch = {k: v.to(device) for k, v in batch.items()}
        return float(scorer(**batch)) / int((batch["labels"][:, 1:] != NO_LOSS).sum())

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Method("lorafit", model, step, lorafit_batches, first_loss, trainable, layers)


def build_plain(key: str, model: nn.Module, device: torch.device) -> Method:
    """peft LoRA on c_attn, or every parameter trainable; a plain forward/backward/AdamW loop either way."""
    if key == "peft":
        modules, fan_in_fan_out = PEFT_TARGETS[model.config.model_type]
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=modules,
                            fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR_LORA if key == "peft" else LR_FULL, weight_decay=0.0)
    pad_id = model.config.eos_token_id
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step(rows: list[dict]) -> tuple[float, int]:
        batch = {k: v.to(device, non_blocking=True) for k, v in pad_batch(rows, pad_id).items()}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), int(batch["attention_mask"].sum())

    def first_loss(batch: dict) -> float:
        return float(model(**{k: v.to(device) for k, v in batch.items()}).loss)

    return Method(key, model, step, shuffled_batches, first_loss, sum(p.numel() for p in trainable))


def base_model(config, device: torch.device, seed: int = SEED) -> nn.Module:
    """Random weights made on `device`: fp32 on a CPU, bf16 on a GPU (lorafit's default there, for every method)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device.type == "cuda" else None)


def flop_params(model: nn.Module) -> int:
    """N: every weight a token passes through in a matmul. Lookups (position embeddings, an input embedding
    not tied to the head) are not counted; a tied embedding counts once, as the head."""
    distinct = {p.data_ptr(): p.numel() for p in model.parameters()}
    head = model.get_output_embeddings().weight.data_ptr()
    lookups = [model.get_input_embeddings(), getattr(getattr(model, "transformer", None), "wpe", None)]
    return sum(distinct.values()) - sum(m.weight.numel() for m in lookups if m is not None
                                        and m.weight.data_ptr() != head)


def lora_flops_per_token(method: Method, rows: list[dict]) -> float:
    """lorafit.report.throughput's model FLOPs per token of a LoRA step on these rows: attention over each row's own
    length (token-weighted mean), the head on the supervised share of the positions."""
    lengths = [len(row["input_ids"]) for row in rows]
    supervised = sum(sum(label != NO_LOSS for label in row["labels"][1:]) for row in rows)
    return training_flops_per_token(method.model, method.layers, seq_len=sum(n * n for n in lengths) / sum(lengths),
                                    supervised_fraction=supervised / sum(lengths))


# --------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_first_loss(methods: list[Method], batch: dict, tolerance: float) -> dict:
    """With B = 0 every method is the base model: their losses on one batch must agree (no dropout)."""
    losses = {}
    with torch.no_grad():
        for method in methods:
            method.model.eval()
            losses[method.key] = method.first_loss(batch)
            method.model.train()
    reference = losses.get("peft", next(iter(losses.values())))
    worst = max(abs(value - reference) / abs(reference) for value in losses.values())
    return {"losses": losses, "max_relative_difference": worst, "tolerance": tolerance, "agree": worst <= tolerance}


def run_rounds(methods: list[Method], rows: list[dict], batch_size: int, device: torch.device, console, what) -> dict:
    """One step of each method in turn per round; each method walks its own arrangement of the same rows."""
    schedules = {m.key: m.arrange(rows, batch_size) for m in methods}
    times = {m.key: [] for m in methods}
    tokens = {m.key: 0 for m in methods}
    padded = {m.key: 0 for m in methods}
    for index in range(len(next(iter(schedules.values())))):
        for method in methods:
            batch_rows = [rows[i] for i in schedules[method.key][index]]
            synchronize(device)
            start = time.perf_counter()
            loss, count = method.step(batch_rows)
            synchronize(device)
            elapsed = time.perf_counter() - start
            times[method.key].append(elapsed)
            tokens[method.key] += count
            padded[method.key] += len(batch_rows) * max(len(r["input_ids"]) for r in batch_rows)
            line = f"  {what} step {index + 1} {method.key:8s} {elapsed:7.2f} s  loss {loss:.4f}"
            console.print(line, highlight=False)
    return {"times": times, "tokens": tokens, "padded": padded}


def read_status_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) in KiB; without /proc (macOS), 0 for now and the lifetime peak for the peak."""
    status = Path("/proc/self/status")
    if not status.exists():
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return 0 if field == "VmRSS" else peak // (1024 if sys.platform == "darwin" else 1)
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Linux resets the peak RSS (VmHWM) to the current RSS when 5 is written to clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_memory(args, job: Job, key: str) -> dict:
    """In this (fresh) process: the peak memory of one steady-state step of `key` on the worst-case batch."""
    device = torch.device(args.device)
    config = model_config(job, args.quick)
    rows = make_rows(job, config.vocab_size, args.steps * job.batch_size, "measured")
    batch = [rows[i] for i in worst_case_batch(rows, job.batch_size)]
    baseline_kib = read_status_kib("VmRSS") if device.type == "cpu" else 0
    method = build_method(key, base_model(config, device), device, lambda: make_accelerator(device), args.compile)
    method.step([min(rows, key=lambda row: len(row["input_ids"]))])  # creates the AdamW state cheaply
    gc.collect()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        method.step(batch)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "kind": "CUDA max_memory_allocated"}
    was_reset = reset_peak_rss()
    method.step(batch)
    peak = (read_status_kib("VmHWM") - baseline_kib) * 1024
    if not baseline_kib:
        return {"peak_bytes": peak, "kind": "peak RSS of a fresh process, libraries included"}
    kind = "peak RSS of a fresh process above its RSS before the model was built, large blocks unmapped at free"
    return {"peak_bytes": peak, "kind": kind if was_reset else kind + " (peak not reset after model build)"}


def memory_in_child(args, job: Job, key: str) -> dict:
    command = [sys.executable, __file__, "--memory-child", f"{job.key}:{key}", "--steps", str(args.steps),
               "--device", args.device, "--threads", str(args.threads)]
    command += [flag for flag, on in (("--quick", args.quick), ("--compile", args.compile)) if on]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=live_memory_env())
    if done.returncode != 0:
        raise RuntimeError(f"memory pass for {key} on job {job.key} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def live_memory_env() -> dict[str, str]:
    """glibc unmaps every block of 128 KiB or more when it is freed, instead of caching it for reuse.

    Then peak RSS follows the memory tensors actually hold (as max_memory_allocated does on a GPU), not
    what malloc happened to keep: with the default, the same step's peak varies by hundreds of MiB.
    """
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def make_accelerator(device: torch.device):
    return Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type == "cpu")


# --------------------------------------------------------------------------- one job


def run_job(args, job: Job, console: Console) -> dict:
    started = time.perf_counter()
    device = torch.device(args.device)
    config = model_config(job, args.quick)
    warmup_rows = make_rows(job, config.vocab_size, args.warmup * job.batch_size, "warmup")
    rows = make_rows(job, config.vocab_size, args.steps * job.batch_size, "measured")
    base = base_model(config, device)
    accelerator = make_accelerator(device)
    methods = [build_method(key, copy.deepcopy(base), device, lambda: accelerator, args.compile)
               for key in job.methods]
    # Model FLOPs per token: the same useful work for both LoRA methods; full fine-tuning adds 2N of weight gradients.
    lora_flops = lora_flops_per_token(methods[0], rows)
    flops = {key: lora_flops + (2 * flop_params(base) if key == "full" else 0) for key in job.methods}
    del base

    first_batch = pad_batch([rows[i] for i in shuffled_batches(rows, job.batch_size)[0]], config.eos_token_id)
    tolerance = BF16_LOSS_TOLERANCE if device.type == "cuda" else LOSS_TOLERANCE
    numerics = check_first_loss(methods, first_batch, tolerance)
    console.print(f"job {job.key}: first-step loss {numerics['losses']} "
                  f"(max relative difference {numerics['max_relative_difference']:.2e})", highlight=False)
    if args.warmup:
        run_rounds(methods, warmup_rows, job.batch_size, device, console, "warmup")
    measured = run_rounds(methods, rows, job.batch_size, device, console, "measured")
    trainable = {m.key: m.trainable for m in methods}
    del methods
    gc.collect()

    memory = {}
    for key in job.methods:
        console.print(f"  memory pass {key} (fresh process)", highlight=False)
        memory[key] = memory_in_child(args, job, key)
    result = summarize(args, job, measured, memory, trainable, numerics, flops, device)
    result["wall_s"] = time.perf_counter() - started
    return result


def summarize(args, job, measured, memory, trainable, numerics, flops, device) -> dict:
    peak = peak_tflops(args, device) if device.type == "cuda" else None
    peak_flops = peak * 1e12 if peak else None
    methods = {}
    for key in job.methods:
        times = measured["times"][key]
        tokens_per_s = measured["tokens"][key] / sum(times)
        methods[key] = {
            "label": LABELS[key] + (" (compiled)" if key == "lorafit" and args.compile else ""),
            "trainable_params": trainable[key],
            "tokens_per_s": tokens_per_s,
            "median_step_s": statistics.median(times),
            "step_s": times,
            "tokens": measured["tokens"][key],
            "padded_tokens": measured["padded"][key],
            "padding_efficiency": measured["tokens"][key] / measured["padded"][key],
            "peak_memory_bytes": memory[key]["peak_bytes"],
            "memory_kind": memory[key]["kind"],
            "flops_per_token": flops[key],
            "mfu": flops[key] * tokens_per_s / peak_flops if peak_flops else None,
        }
    return {
        "job": {"key": job.key, "title": job.title, "task": job.task, "model": job.model,
                "batch_size": job.batch_size, "max_length": job.max_length,
                "measured_rows": args.steps * job.batch_size},
        "machine": machine(device),
        "settings": {"warmup_steps": args.warmup, "measured_steps": args.steps, "quick": args.quick,
                     "compile": args.compile, "seed": SEED,
                     "precision": "bf16 weights, bf16 autocast" if device.type == "cuda" else "fp32",
                     "lora": {"rank": RANK, "alpha": ALPHA, "dropout": DROPOUT}, "max_grad_norm": MAX_GRAD_NORM,
                     "peak_tflops": peak},
        "methods": methods,
        "numerics": numerics,
        "ratios": ratios(job, methods),
        "notes": NOTES,
    }


def ratios(job: Job, methods: dict) -> list[dict]:
    """The issue's ratios; those the job sets a target for carry it and a verdict."""
    lora, peft, full = methods["lorafit"], methods["peft"], methods.get("full")
    rows = [
        ("tokens_per_s", "tokens/s lorafit / peft", lora["tokens_per_s"] / peft["tokens_per_s"]),
        ("memory", "peak memory lorafit / peft", lora["peak_memory_bytes"] / peft["peak_memory_bytes"]),
    ]
    if full:
        rows += [("step_time", "median step time lorafit / full", lora["median_step_s"] / full["median_step_s"]),
                 ("peft_step_time", "median step time peft / full", peft["median_step_s"] / full["median_step_s"])]
    if lora["mfu"] is not None:
        rows.append(("mfu", "MFU of lorafit (model FLOPs / dense bf16 peak)", lora["mfu"]))
    out = []
    for key, name, value in rows:
        target = job.targets.get(key)
        sense = ">=" if key in ("tokens_per_s", "mfu") else "<="
        verdict = None if target is None else (value >= target if sense == ">=" else value <= target)
        out.append({"key": key, "name": name, "value": value, "target": f"{sense} {target}" if target else None,
                    "pass": verdict})
    return out


def peak_tflops(args, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    peak, _ = peak_for_name(torch.cuda.get_device_name(device))
    return peak / 1e12 if peak else None


def machine(device: torch.device) -> dict:
    info = {"device": device.type, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu": cpu_name(), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info.update(transformers=transformers.__version__, peft=peft.__version__)
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- job p: 1 vs 2 processes

PROCESS_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-sst2.toml"
PROCESS_BATCH = 16  # global: batch_size 16 on one process, 8 on each of two
PROCESS_TOLERANCE = 1e-5  # max abs difference of the two runs' final adapter tensors
PROCESS_NOTES = [
    (
        "Job p: each run is one `lorafit train` command (`python -m lorafit`, or `python -m torch.distributed.run "
        "--standalone --nproc_per_node 2 -m lorafit`, i.e. torchrun) in a fresh run folder; its wall time includes "
        "starting Python, loading model and data, evaluating 32 rows before and after, and saving. tokens/s is "
        "report.json's throughput.tokens_per_s: training steps only, every process's tokens."
    ),
    (
        "Job p gives both runs the same CPU threads in all (OMP_NUM_THREADS): 1 process × 2t threads against "
        "2 processes × t, so neither oversubscribes the cores. On GPUs the 2-process run uses 2 GPUs (NCCL); "
        "both train in float32 there too, so that the adapters can be compared to 1e-5."
    ),
]


def run_processes(args, console: Console) -> dict:
    """Job p: the shipped tiny recipe for a fixed number of steps at global batch 16, on 1 process and on 2."""
    started = time.perf_counter()
    device = torch.device(args.device)
    steps = 5 if args.quick else 30
    job = {"key": "p", "title": "1 vs 2 processes on the same global batch", "batch_size": PROCESS_BATCH,
           "steps": steps, "recipe": "recipes/tiny-sst2.toml"}
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        reason = f"needs 2 GPUs, this machine has {torch.cuda.device_count()}"
        return {"job": job, "machine": machine(device), "skipped": reason}
    threads = max(args.threads // 2, 1)  # per process of the two; the single process gets twice as many
    with tempfile.TemporaryDirectory(prefix="lorafit-bench-") as scratch:
        folders = {count: Path(scratch) / f"{count}-process" for count in (1, 2)}
        runs = {str(count): train_processes(count, steps, threads * 2 // count, device, folder, console)
                for count, folder in folders.items()}
        adapters = [load_file(folder / "adapter" / "adapter_model.safetensors") for folder in folders.values()]
    if adapters[0].keys() != adapters[1].keys():
        raise RuntimeError("job p: the 1-process and 2-process adapters hold different tensors")
    difference = max(float((adapters[0][k] - adapters[1][k]).abs().max()) for k in adapters[0])
    speedup = runs["2"]["tokens_per_s"] / runs["1"]["tokens_per_s"]
    return {
        "job": job,
        "machine": machine(device),
        "settings": {"steps": steps, "global_batch": PROCESS_BATCH, "threads_in_all": 2 * threads, "quick": args.quick},
        "methods": runs,
        "numerics": {"check": "final adapters, max abs difference", "max_abs_difference": difference,
                     "tolerance": PROCESS_TOLERANCE, "agree": difference <= PROCESS_TOLERANCE},
        "ratios": [{"key": "processes_tokens_per_s", "name": "tokens/s 2 processes / 1 process", "value": speedup,
                    "target": None, "pass": None}],
        "notes": PROCESS_NOTES,
        "wall_s": time.perf_counter() - started,
    }


def train_processes(count: int, steps: int, threads: int, device: torch.device, run_dir: Path, console) -> dict:
    """One `lorafit train` command on `count` processes, started as a user starts it and timed to its exit."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={count}"] if count > 1 else []
    # float32 also on GPUs: in bf16 two batch shapes round differently, and the adapters could not agree to 1e-5
    overrides = {"train.max_steps": steps, "train.batch_size": PROCESS_BATCH // count, "train.save_every": 0,
                 "data.max_eval_examples": 32, "model.dtype": "float32"}
    command = [sys.executable, *launcher, "-m", "lorafit", "train", "-r", str(PROCESS_RECIPE), "-o", str(run_dir)]
    command += [part for key, value in overrides.items() for part in ("--set", f"{key}={value}")]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"job p: {' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    report = json.loads((run_dir / "report.json").read_text())
    throughput = report["throughput"]
    label = f"{count} process{'es' if count > 1 else ''} × batch {PROCESS_BATCH // count}"
    console.print(f"  job p: {label}: {throughput['tokens_per_s']:,.0f} tokens/s, {wall:.1f} s", highlight=False)
    return {"label": label, "processes": report["world_size"], "global_batch": report["global_batch"],
            "threads_per_process": threads, "device": report["device"], "tokens_per_s": throughput["tokens_per_s"],
            "train_s": throughput["wall_s"], "command_s": wall, "command": " ".join(["python", *command[1:]])}


# --------------------------------------------------------------------------- output


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def job_table(result: dict) -> Table:
    job, settings = result["job"], result["settings"]
    table = Table(title=f"job {job['key']}: {job['title']} — batch {job['batch_size']}, up to {job['max_length']} "
                  f"tokens, {settings['measured_steps']} measured steps each")
    for column in ("method", "trainable", "tokens/s", "median step", "padding eff.", "peak memory", "first loss"):
        table.add_column(column, justify="left" if column == "method" else "right")
    gpu = result["machine"]["device"] == "cuda"
    if gpu:
        table.add_column("MFU", justify="right")
    for key, m in result["methods"].items():
        loss = result["numerics"]["losses"][key]
        cells = [m["label"], f"{m['trainable_params']:,}", f"{m['tokens_per_s']:,.0f}", f"{m['median_step_s']:.3f} s",
                 f"{m['padding_efficiency']:.0%}", mib(m["peak_memory_bytes"]), f"{loss:.6f}"]
        if gpu:
            cells.append(f"{m['mfu']:.1%}" if m["mfu"] is not None else "n/a")
        table.add_row(*cells)
    return table


def processes_table(result: dict) -> Table:
    job = result["job"]
    table = Table(title=f"job p: {job['title']} — {job['recipe']}, {job['steps']} steps, global batch "
                  f"{job['batch_size']}, {result['settings']['threads_in_all']} CPU threads in all")
    for column in ("run", "threads each", "tokens/s (training)", "training", "whole command"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for m in result["methods"].values():
        table.add_row(m["label"], str(m["threads_per_process"]), f"{m['tokens_per_s']:,.0f}", f"{m['train_s']:.1f} s",
                      f"{m['command_s']:.1f} s")
    return table


def ratio_table(result: dict) -> Table:
    table = Table(title=f"job {result['job']['key']}: ratios")
    for column in ("ratio", "value", "target", "verdict"):
        table.add_column(column, justify="left" if column == "ratio" else "right")
    for ratio in result["ratios"]:
        verdict = "" if ratio["pass"] is None else ("[green]PASS[/]" if ratio["pass"] else "[red]MISS[/]")
        table.add_row(ratio["name"], ratio_value(ratio), ratio["target"] or "—", verdict)
    numerics = result["numerics"]
    verdict = "[green]PASS[/]" if numerics["agree"] else "[red]FAIL[/]"
    table.add_row(*numerics_cells(numerics), numerics.get("target") or f"<= {numerics['tolerance']:.0e}", verdict)
    return table


def ratio_value(ratio: dict) -> str:
    if ratio.get("unit") == "points":
        return f"{ratio['value']:+.1%}"
    if "unit" in ratio:  # job s: bytes per token, seconds per million rows
        return f"{ratio['value']:.2f} {ratio['unit']}"
    return f"{ratio['value']:.1%}" if ratio["key"] == "mfu" else f"{ratio['value']:.2f}x"


def numerics_cells(numerics: dict) -> tuple[str, str]:
    """The correctness check's name and value: job p compares adapters, job k losses, the others first-step losses."""
    if "rows_scored" in numerics:  # job r: every held-out row scored by both methods
        return numerics["check"], ", ".join(map(str, numerics["rows_scored"]))
    if "max_abs_difference" in numerics:
        return numerics["check"], f"{numerics['max_abs_difference']:.1e}"
    if "check" in numerics:  # job k: packed vs padded loss
        return numerics["check"], f"{numerics['max_relative_difference']:.1e}"
    return "first-step loss, max relative difference", f"{numerics['max_relative_difference']:.1e}"


def describe_machine(info: dict) -> str:
    where = info.get("gpu") or f"{info['cpu']}, {info['threads']} torch threads of {info['cpu_count']} cores"
    return f"{info['device']}: {where}; torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}"


def markdown(results: list[dict]) -> str:
    """The run's tables in Markdown, ready for the README's Performance section."""
    lines = [f"Machine: {describe_machine(results[0]['machine'])}.", ""]
    for result in results:
        job = result["job"]
        if job["key"] in ("p", "k", "r", "s"):
            lines += {"p": processes_markdown, "k": packing_markdown, "r": parity_markdown,
                      "s": data_markdown}[job["key"]](result)
            continue
        steps = result["settings"]["measured_steps"]
        title = f"Job {job['key']}: {job['title']}, batch {job['batch_size']}, up to {job['max_length']} tokens"
        lines += [f"{title}, {steps} measured steps each.", ""]
        lines += ["| method | tokens/s | median step | peak memory |", "|---|---:|---:|---:|"]
        for m in result["methods"].values():
            lines.append(f"| {m['label']} | {m['tokens_per_s']:,.0f} | {m['median_step_s']:.2f} s "
                         f"| {mib(m['peak_memory_bytes'])} |")
        lines += ["", "| ratio | measured | target |", "|---|---:|---|"]
        for ratio in result["ratios"]:
            if ratio["target"]:
                verdict = "PASS" if ratio["pass"] else "MISS"
                lines.append(f"| {ratio['name']} | {ratio_value(ratio)} | {ratio['target']} ({verdict}) |")
        lines.append("")
    return "\n".join(lines)


def processes_markdown(result: dict) -> list[str]:
    job = result["job"]
    if "skipped" in result:
        return [f"Job p: {job['title']}: skipped, {result['skipped']}.", ""]
    lines = [f"Job p: {job['title']}: {job['recipe']}, {job['steps']} steps, global batch {job['batch_size']}, "
             f"{result['settings']['threads_in_all']} CPU threads in all.", "",
             "| run | tokens/s (training) | whole command |", "|---|---:|---:|"]
    for m in result["methods"].values():
        lines.append(f"| {m['label']} | {m['tokens_per_s']:,.0f} | {m['command_s']:.1f} s |")
    numerics, ratio = result["numerics"], result["ratios"][0]
    name, value = numerics_cells(numerics)
    verdict = "PASS" if numerics["agree"] else "FAIL"
    lines += ["", "| ratio | measured | target |", "|---|---:|---|"]
    lines += [f"| {ratio['name']} | {ratio['value']:.2f}x | — |",
              f"| {name} | {value} | <= {numerics['tolerance']:.0e} ({verdict}) |", ""]
    return lines


def one_line(results: list[dict]) -> dict:
    """Each job's ratios, MFU and correctness check, keyed by job: the line `make gpu-check` ends with."""
    jobs = {}
    for result in results:
        if "skipped" in result:
            jobs[result["job"]["key"]] = {"skipped": result["skipped"]}
            continue
        numerics = result["numerics"]
        line = {ratio["key"]: round(ratio["value"], 4) for ratio in result["ratios"]}
        line["targets_met"] = all(ratio["pass"] is not False for ratio in result["ratios"])
        if "max_relative_difference" in numerics:
            line["first_step_loss_max_rel_diff"] = numerics["max_relative_difference"]
        elif "rows_scored" in numerics:
            line["rows_scored"] = numerics["rows_scored"]
        else:
            line["adapter_max_abs_diff"] = numerics["max_abs_difference"]
        line["numerics_agree"] = numerics["agree"]
        line["title"] = result["job"]["title"]
        jobs[result["job"]["key"]] = line
    info = results[0]["machine"]
    return {"device": info.get("gpu") or info["cpu"], "torch": info["torch"], "jobs": jobs}


def write_results(results: list[dict], console: Console) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for result in results:
        path = RESULTS / f"bench-{result['job']['key']}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
    combined = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "jobs": results}
    (RESULTS / "bench.json").write_text(json.dumps(combined, indent=2) + "\n")
    (RESULTS / "bench.md").write_text(markdown(results))
    console.print(f"results: {RESULTS}/bench.json, bench-<job>.json and bench.md", highlight=False)


# --------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="a,b,p,k,r,s",
                        help="comma-separated: a (classification), b (LM at 512 tokens), p (1 vs 2 processes), "
                        "k (packed vs padded), r (accuracy parity on real data), s (training start as the data "
                        "grows); for a GPU: l (1B-class Llama at 2,048 tokens), m (GPT-2-medium classification)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per method (default 4, quick 3)")
    parser.add_argument("--parity-steps", type=int, default=PARITY_STEPS,
                        help=f"job r's training steps per seed and method (default {PARITY_STEPS})")
    parser.add_argument("--parity-seeds", default=",".join(map(str, PARITY_SEEDS)),
                        help="job r's seeds, comma-separated (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per method, not measured (default 1)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's, all cores)")
    parser.add_argument("--quick", action="store_true", help="a tiny model: a smoke test in seconds")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"],
                        help="attention implementation of job k's model (default sdpa, transformers' default)")
    parser.add_argument("--compile", action="store_true", help="lorafit with [train] compile = true (2 warm-up steps)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a ratio misses its target")
    parser.add_argument("--json", action="store_true", help="end with one JSON line: each job's ratios and checks")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 4)
    if args.warmup is None:  # a compiled model compiles again at the second batch shape (dynamic lengths)
        args.warmup = 2 if args.compile else 1
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    quiet_libraries()
    jobs = define_jobs(args.quick, gpu=args.device == "cuda")
    if args.memory_child:
        job_key, method = args.memory_child.split(":")
        print(json.dumps(measure_memory(args, jobs[job_key], method)))
        return 0
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # a log file gets the tables unwrapped
    unknown = [key for key in args.jobs.split(",") if key not in [*jobs, "p", "k", "r", "s"]]
    if unknown:
        choice = ", ".join([*jobs, "p", "k", "r", "s"])
        console.print(f"unknown job {unknown[0]!r}; use --jobs with a comma-separated choice of {choice}")
        return 2
    results = []
    for key in args.jobs.split(","):
        if key == "k":
            gpt2_small = partial(model_config, jobs["a"])  # job a's model, GPT-2 small (or the quick tiny one)
            results.append(run_packing(args, console, model_config=gpt2_small, base_model=base_model,
                                       build_lorafit=build_lorafit, make_accelerator=make_accelerator, machine=machine))
        elif key == "r":
            results.append(run_parity(args, console, machine))
        elif key == "s":
            results.append(run_data(args, console, machine=machine))
        else:
            results.append(run_processes(args, console) if key == "p" else run_job(args, jobs[key], console))
    console.print(describe_machine(results[0]["machine"]), highlight=False)
    measured = [result for result in results if "skipped" not in result]
    for result in results:
        if "skipped" in result:
            console.print(f"[yellow]job {result['job']['key']} skipped: {result['skipped']}[/]")
            continue
        tables = {"p": processes_table, "k": packing_table, "r": parity_table, "s": data_table}
        console.print(tables.get(result["job"]["key"], job_table)(result))
        console.print(ratio_table(result))
    for note in dict.fromkeys(note for result in measured for note in result["notes"]):
        console.print(f"• {note}", highlight=False)
    if args.quick:
        console.print("[yellow]--quick runs a tiny model: a smoke test whose timings and ratios mean nothing[/]")
    write_results(results, console)
    if args.json:
        print(json.dumps(one_line(results)), flush=True)
    failed = [result for result in measured if not result["numerics"]["agree"]]
    for result in failed:
        console.print(f"[red]job {result['job']['key']}: {numerics_cells(result['numerics'])[0]} is above its "
                      "tolerance: the runs compared did not compute the same thing[/]")
    if failed:
        return 1
    missed = [r for result in measured for r in result["ratios"] if r["pass"] is False]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
