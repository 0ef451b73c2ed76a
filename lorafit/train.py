"""The training loop: recipe -> model + LoRA -> batches -> AdamW steps -> adapter, checkpoints and report."""

from __future__ import annotations

import hashlib
import json
import math
import resource
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lorafit import checkpoint
from lorafit.adapter import save_adapter
from lorafit.data import IGNORE, collate, length_grouped_batches, tokenize_split
from lorafit.errors import LorafitError
from lorafit.evaluate import evaluate_split
from lorafit.inject import inject_lora, lora_layers
from lorafit.lora import LoRALinear
from lorafit.loss import loss_sum
from lorafit.model import DTYPES, decoder_blocks, fuse_activations, load_model, load_tokenizer
from lorafit.recipe import LoraSection, Recipe, recipe_toml
from lorafit.report import parameter_report, summary_tables
from lorafit.storage import write_atomic, write_json

# Keys that may change between a run and its resume: they do not change what is computed.
RESUMABLE_KEYS = {"train.save_every", "train.log_every", "train.eval_batch_size", "data.max_eval_examples", "output.dir"}


@dataclass
class Plan:
    """Which rows form each optimizer step: a pure function of (seed, epoch), so a resumed run sees the same."""

    lengths: list[int]
    batch_size: int
    grad_accum: int
    seed: int
    _epochs: dict[int, list[list[list[int]]]] = field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(math.ceil(len(self.lengths) / self.batch_size) / self.grad_accum)

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch not in self._epochs:
            batches = length_grouped_batches(self.lengths, self.batch_size, self.seed, epoch)
            self._epochs = {epoch: [batches[i : i + self.grad_accum] for i in range(0, len(batches), self.grad_accum)]}
        return self._epochs[epoch][index]


def data_fingerprint(rows: list[dict]) -> str:
    """A hash of the tokenized training rows, so a resumed run can tell that its data changed underneath it."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row["input_ids"], row["labels"]]).encode())
    return digest.hexdigest()


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup from 0, then constant, linear decay to 0, or cosine decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return max(0.0, 1.0 - progress)


@contextmanager
def stop_on_signals():
    """SIGINT/SIGTERM ask the loop to stop after the current step, so a checkpoint can be saved."""
    requested: list[int] = []

    def handler(signum, _frame):
        if requested:  # a second signal: stop now
            raise KeyboardInterrupt
        requested.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield requested  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def train(recipe: Recipe, *, resume: bool = False, console: Console | None = None) -> dict:
    """Fine-tune per `recipe`; returns the report that is also written to <run>/report.json."""
    console = console or Console(stderr=True)
    run_dir = Path(recipe.output.dir)
    resume_from = _check_run_dir(run_dir, recipe, resume)
    checkpoint.remove_partial(run_dir)
    settings = recipe.train
    set_seed(settings.seed)
    accelerator = Accelerator(mixed_precision=settings.mixed_precision)

    tokenizer = load_tokenizer(recipe.model.name, trust_remote_code=recipe.model.trust_remote_code)
    train_split = tokenize_split(recipe.data, tokenizer, recipe.data.train_split)
    eval_split = tokenize_split(recipe.data, tokenizer, recipe.data.eval_split)
    _report_dropped(console, recipe.data.train_split, train_split)
    _report_dropped(console, recipe.data.eval_split, eval_split)
    if len(train_split.examples) == 0:
        raise LorafitError(f"no trainable rows in split {recipe.data.train_split!r}; raise [data] max_length")

    model = load_model(recipe.model.name, recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code)
    lora = recipe.lora
    prepare_model(model, lora, gradient_checkpointing=settings.gradient_checkpointing, compile=settings.compile)

    rows = train_split.examples.to_list()
    plan = Plan([len(row["input_ids"]) for row in rows], settings.batch_size, settings.grad_accum, settings.seed)
    total_steps = settings.max_steps or settings.epochs * plan.steps_per_epoch
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay, foreach=True)
    schedule = partial(lr_factor, warmup=settings.warmup_steps, total=total_steps, schedule=settings.schedule)
    scheduler = LambdaLR(optimizer, schedule)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)

    def write_adapter(folder: Path) -> int:
        return save_adapter(unwrapped, folder, base_model=recipe.model.name, targets=lora.targets, extra={"recipe": recipe.model_dump()})

    progress = {"eval_before": None, "tokens": 0, "train_seconds": 0.0, "data_fingerprint": data_fingerprint(rows)}
    start_step = 0
    if resume_from is not None:
        restored = checkpoint.load_checkpoint(resume_from, unwrapped, optimizer.optimizer, scheduler.scheduler)
        if restored.get("data_fingerprint", progress["data_fingerprint"]) != progress["data_fingerprint"]:
            raise LorafitError(
                f"the training rows differ from those {run_dir} started with (data file or tokenizer changed); "
                "restore them to resume, or start a new run"
            )
        start_step = restored.pop("step")
        progress.update(restored)
        console.print(f"resuming from {resume_from.name} (step {start_step} of {total_steps})")
    else:
        write_atomic(run_dir / "recipe.toml", recipe_toml(recipe))
        progress["eval_before"] = evaluate_split(model, eval_split, recipe.data, tokenizer, settings.eval_batch_size)
        _print_eval(console, "before training", progress["eval_before"])

    metrics_path = run_dir / "metrics.jsonl"
    metrics = _read_metrics(metrics_path, upto=start_step)
    model.train()

    def save(step: int) -> None:
        checkpoint.save_checkpoint(run_dir, step, unwrapped, optimizer.optimizer, scheduler.scheduler, progress, write_adapter)

    with stop_on_signals() as stop, _progress_bar(console) as bar:
        task = bar.add_task("training", total=total_steps, completed=start_step, loss=float("nan"), lr=0.0, tps=0.0)
        window_tokens, window_start = 0, time.perf_counter()
        for step in range(start_step, total_steps):
            step_start = time.perf_counter()
            micro = [collate([rows[i] for i in batch], tokenizer.pad_token_id) for batch in plan.micro_batches(step)]
            loss, tokens = _optimizer_step(accelerator, model, optimizer, scheduler, micro, settings.max_grad_norm)
            if not math.isfinite(loss):
                last = checkpoint.latest_checkpoint(run_dir)
                kept = f"; the last good checkpoint is {last}" if last else ""
                raise LorafitError(f"loss became {loss} at step {step + 1}; lower [train] lr or use float32{kept}", exit_code=1)
            progress["tokens"] += tokens
            progress["train_seconds"] += time.perf_counter() - step_start
            window_tokens += tokens
            done = step + 1
            if done % settings.log_every == 0 or done == total_steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": done, "loss": loss, "lr": scheduler.get_last_lr()[0], "tokens_per_s": window_tokens / elapsed}
                metrics.append(record)
                write_atomic(metrics_path, "".join(_json_line(m) for m in metrics))
                bar.update(task, loss=loss, lr=record["lr"], tps=record["tokens_per_s"])
                window_tokens, window_start = 0, time.perf_counter()
            bar.update(task, completed=done)
            if settings.save_every and done % settings.save_every == 0 and done < total_steps:
                save(done)
            if stop:
                save(done)
                raise LorafitError(f"stopped at step {done}; checkpoint saved, continue with --resume", exit_code=130)

    adapter_bytes = write_adapter(run_dir / "adapter")
    eval_after = evaluate_split(model, eval_split, recipe.data, tokenizer, settings.eval_batch_size)
    _print_eval(console, "after training", eval_after)
    report = _build_report(recipe, unwrapped, accelerator, total_steps, progress, eval_after, adapter_bytes)
    write_json(run_dir / "report.json", report)
    for table in summary_tables(report, run_dir):
        console.print(table)
    return report


def prepare_model(
    model: nn.Module, lora: LoraSection, *, gradient_checkpointing: bool = False, compile: bool = False
) -> dict[str, LoRALinear]:
    """Wrap the targets in LoRA layers, freeze the rest, and set up the trunk for a cheap training step."""
    layers = inject_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout, init=lora.init, use_rslora=lora.use_rslora)
    fuse_activations(model)
    if gradient_checkpointing:
        _enable_checkpointing(model)
    if compile:
        # Block by block, as torchtune does: every block shares one compiled graph, and the loss code
        # that calls the trunk and the head separately stays as it is.
        for block in decoder_blocks(model):
            block.compile()
    return layers


def _enable_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward; transformers 5 renamed the switch."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def _optimizer_step(accelerator, model, optimizer, scheduler, micro_batches, max_grad_norm) -> tuple[float, int]:
    """One AdamW step over several micro-batches, weighting every supervised token alike.

    The loss is the sum over micro-batches of their token losses divided by the tokens in the whole step,
    so accumulating 4 batches of 2 gives the same gradient as one batch of 8.
    """
    supervised = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches)
    input_tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
    total_loss = torch.zeros((), device=accelerator.device)
    for index, batch in enumerate(micro_batches):
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        last = index == len(micro_batches) - 1
        with (nullcontext() if last else accelerator.no_sync(model)), accelerator.autocast():
            summed, _ = loss_sum(model, batch)
            loss = summed / max(supervised, 1)
        accelerator.backward(loss)
        total_loss += loss.detach()
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total_loss.item(), input_tokens


def _check_run_dir(run_dir: Path, recipe: Recipe, resume: bool) -> Path | None:
    """Never overwrite a finished or interrupted run; on --resume, refuse a recipe that changed what matters."""
    latest = checkpoint.latest_checkpoint(run_dir)
    if not resume:
        if latest is not None or (run_dir / "adapter").exists():
            raise LorafitError(f"{run_dir} already holds a run; pass --resume to continue it or --output for a new one")
        return None
    if latest is None:
        raise LorafitError(f"{run_dir} has no complete checkpoint to resume from; drop --resume to start fresh")
    saved = run_dir / "recipe.toml"
    if saved.is_file():
        from lorafit.recipe import load_recipe

        changed = _changed_keys(load_recipe(saved), recipe) - RESUMABLE_KEYS
        if changed:
            key = sorted(changed)[0]
            raise LorafitError(f"recipe key {key} changed since the run started; restore it to resume, or start a new run")
    return latest


def _changed_keys(old: Recipe, new: Recipe) -> set[str]:
    before, after = old.model_dump(), new.model_dump()
    return {f"{s}.{k}" for s in after for k in after[s] if before.get(s, {}).get(k) != after[s][k]}


def _report_dropped(console: Console, name: str, split) -> None:
    if split.dropped:
        console.print(
            f"[yellow]note:[/] {split.dropped} of {split.total} rows in {name!r} lost all supervised tokens to "
            "\\[data] max_length and were left out"
        )


def _read_metrics(path: Path, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    return [m for m in map(json.loads, path.read_text().splitlines()) if m["step"] <= upto]


def _json_line(record: dict) -> str:
    return json.dumps(record) + "\n"


def _progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _print_eval(console: Console, when: str, result: dict) -> None:
    accuracy = f"  accuracy {result['accuracy']:.3f}" if "accuracy" in result else ""
    console.print(
        f"eval {when}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}{accuracy}  ({result['examples']} examples)"
    )


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "peak_kind": "CUDA allocator peak"}
    # Linux reports ru_maxrss in KiB.
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_kind": "process peak RSS"}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def _build_report(recipe, model, accelerator, total_steps, progress, eval_after, adapter_bytes) -> dict:
    report = parameter_report(model, lora_layers(model), DTYPES[recipe.model.dtype].itemsize)
    report["adapter_bytes"] = adapter_bytes
    report["memory"] = {**peak_memory(accelerator.device), **report["memory"]}
    seconds = progress["train_seconds"]
    report["throughput"] = {
        "tokens_per_s": progress["tokens"] / seconds if seconds else 0.0,
        "steps": total_steps,
        "wall_s": seconds,
    }
    report["eval"] = {**eval_after, "before": progress["eval_before"]}
    report["device"] = _device_name(accelerator.device)
    report["mixed_precision"] = recipe.train.mixed_precision
    return report
