"""The training loop: recipe -> model + LoRA -> batches -> AdamW steps -> adapter, checkpoints and report.

`train()` reads as four steps: set up, start or resume, run the steps, finish. With several processes
every rank runs the same code on its share of each step's rows; only the main process writes and prints.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lorafit import checkpoint
from lorafit.adalora import RankAllocator, inject_adalora, rank_allocator
from lorafit.adapter import adapter_files
from lorafit.batches import StepRows, collate, global_batch_split, rank_share, supervised_count, supervised_counts
from lorafit.checkpoint import RunState, data_fingerprint
from lorafit.data import TokenizedSplit, tokenize_split
from lorafit.errors import LorafitError
from lorafit.evaluate import evaluate_split
from lorafit.inject import inject_lora, stores_transposed
from lorafit.lora import LoRALinear, set_dropout_keys
from lorafit.loss import SupervisedLoss
from lorafit.model import (
    decoder_blocks,
    enable_checkpointing,
    fuse_activations,
    load_config,
    load_model,
    load_tokenizer,
    meta_model,
    resolve_precision,
)
from lorafit.parallel import all_sum, any_rank, make_accelerator, shard_model, stop_on_signals
from lorafit.peft_format import WEIGHTS_FILE
from lorafit.quantize import quantize_blocks, require_torchao
from lorafit.recipe import LoraSection, Recipe, TrainSection, recipe_toml
from lorafit.report import print_dropped, print_eval, progress_bar, run_report, summary_tables, training_flops_per_token
from lorafit.storage import append_line, write_atomic, write_folder, write_json


@dataclass
class Run:
    """Everything the loop works on, built once by `set_up`."""

    recipe: Recipe
    console: Console
    accelerator: Accelerator
    tokenizer: object
    rows: list[dict]
    supervised: list[int]  # supervised tokens of each training row
    eval_split: TokenizedSplit
    steps: StepRows
    grad_accum: int
    total_steps: int
    scorer: nn.Module  # SupervisedLoss around the model, wrapped by DDP or sharded by FSDP2
    layers: dict[str, LoRALinear]
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    state: RunState
    resume_from: Path | None
    precision: tuple[str, str]  # (weights dtype, mixed precision) as resolved for this machine
    start_step: int = 0
    ranks: RankAllocator | None = None  # AdaLoRA's importance scores and pruning

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.output.dir)

    @property
    def model(self) -> nn.Module:
        """The causal LM itself (sharded under FSDP2)."""
        return self.accelerator.unwrap_model(self.scorer).model

    def adapter_files(self) -> dict[str, bytes]:
        """The adapter as files; a collective under FSDP2, so every rank calls it."""
        lora, name = self.recipe.lora, self.recipe.model.name
        return adapter_files(self.model, base_model=name, targets=lora.targets, extra={"recipe": self.recipe.model_dump()})


def train(recipe: Recipe, *, resume: bool = False, console: Console | None = None) -> dict:
    """Fine-tune per `recipe`; returns the report that is also written to <run>/report.json."""
    run = set_up(recipe, resume, console or Console(stderr=True))
    start_or_resume(run)
    run_steps(run)
    return finish(run)


def set_up(recipe: Recipe, resume: bool, console: Console) -> Run:
    """Tokenize, check the launch and the run folder, load the model with LoRA, build the optimizer: no file written."""
    settings = recipe.train
    set_seed(settings.seed)
    weights_dtype, mixed_precision = resolve_precision(recipe.model.dtype, settings.mixed_precision)
    accelerator = make_accelerator(mixed_precision)
    world = accelerator.num_processes
    grad_accum = global_batch_split(settings, world)
    if not accelerator.is_main_process:
        console = Console(quiet=True)
    tokenizer = load_tokenizer(recipe.model.name, trust_remote_code=recipe.model.trust_remote_code)
    with accelerator.main_process_first():  # the others read the main process's tokenized cache
        train_split = tokenize_split(recipe.data, tokenizer, recipe.data.train_split)
        eval_split = tokenize_split(recipe.data, tokenizer, recipe.data.eval_split)
    print_dropped(console, recipe.data.train_split, train_split)
    print_dropped(console, recipe.data.eval_split, eval_split)
    rows = train_split.examples.to_list()
    global_batch = settings.batch_size * grad_accum * world
    state = RunState(data_fingerprint=data_fingerprint(rows), global_batch=global_batch, world_size=world)
    resume_from = checkpoint.check_resume(Path(recipe.output.dir), recipe, resume, state)
    if resume_from is not None and recipe.lora.variant == "adalora":
        raise LorafitError("--resume does not restore AdaLoRA's importance scores yet; start a new run")

    model_name, remote_code = recipe.model.name, recipe.model.trust_remote_code
    if recipe.model.quantize != "none":
        require_torchao()
    # compile, FSDP and quantization work block by block: find the blocks before loading
    if settings.compile or settings.parallel == "fsdp" or recipe.model.quantize != "none":
        decoder_blocks(meta_model(load_config(model_name, trust_remote_code=remote_code)))
    model = load_model(model_name, weights_dtype, trust_remote_code=remote_code)
    layers = prepare_model(model, recipe.lora, gradient_checkpointing=settings.gradient_checkpointing,
                           compile=settings.compile, quantize=recipe.model.quantize)
    steps = StepRows([len(row["input_ids"]) for row in rows], global_batch, settings.seed)
    total_steps = settings.max_steps or settings.epochs * steps.steps_per_epoch
    ranks = rank_allocator(layers, recipe.lora, total_steps) if recipe.lora.variant == "adalora" else None
    scorer, optimizer, scheduler = distribute(accelerator, SupervisedLoss(model), settings, total_steps)
    supervised = supervised_counts(train_split.examples)
    return Run(recipe, console, accelerator, tokenizer, rows, supervised, eval_split, steps, grad_accum, total_steps,
               scorer, layers, optimizer, scheduler, state, resume_from, (weights_dtype, mixed_precision), ranks=ranks)


def start_or_resume(run: Run) -> None:
    """A fresh run saves its recipe and evaluates the base; a resumed one restores its newest checkpoint."""
    if run.accelerator.is_main_process:
        checkpoint.remove_partial(run.run_dir)
    if run.resume_from is None:
        if run.accelerator.is_main_process:
            write_atomic(run.run_dir / "recipe.toml", recipe_toml(run.recipe))
        run.state.eval_before = _evaluate(run)
        print_eval(run.console, "before training", run.state.eval_before)
        return
    run.start_step, saved = checkpoint.load_checkpoint(
        run.resume_from, run.model, run.optimizer.optimizer, run.scheduler, rank=run.accelerator.process_index,
        scaler=run.accelerator.scaler,
    )
    run.state = replace(saved, world_size=run.state.world_size)  # what is done so far, on this launch's processes
    run.console.print(f"resuming from {run.resume_from.name} (step {run.start_step} of {run.total_steps})")


def run_steps(run: Run) -> None:
    """The loop: one optimizer step per iteration, logging, checkpoints, and a stop that every rank agrees on."""
    settings, state, accelerator = run.recipe.train, run.state, run.accelerator
    metrics_path = run.run_dir / "metrics.jsonl"
    if accelerator.is_main_process:  # lines past the checkpoint are from steps that run again
        write_atomic(metrics_path, "".join(json.dumps(m) + "\n" for m in _read_metrics(metrics_path, run.start_step)))
    run.scorer.train()
    if accelerator.device.type == "cuda":  # report.json's peak is the steps', not loading's or evaluation's
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    with stop_on_signals() as stop, progress_bar(run.console) as bar, ThreadPoolExecutor(1) as prefetch:
        task = bar.add_task("training", total=run.total_steps, completed=run.start_step, loss=float("nan"), lr=0.0, tps=0.0)
        window_tokens, window_start = 0, time.perf_counter()
        upcoming = prefetch.submit(_micro_batches, run, run.start_step)
        for step in range(run.start_step, run.total_steps):
            step_start = time.perf_counter()
            step_rows, micro = upcoming.result()
            if step + 1 < run.total_steps:  # collate the next step while this one runs
                upcoming = prefetch.submit(_micro_batches, run, step + 1)
            local_loss = optimizer_step(
                accelerator, run.scorer, run.optimizer, run.scheduler, micro, max_grad_norm=settings.max_grad_norm,
                supervised=sum(run.supervised[i] for i in step_rows),
                key_dropout=partial(set_dropout_keys, run.layers.values(), settings.seed, step),
                after_backward=run.ranks and run.ranks.orthogonality_gradients,
                after_step=run.ranks and partial(run.ranks.after_step, step + 1),
            )
            done = step + 1
            logged = done % settings.log_every == 0 or done == run.total_steps
            stops = any_rank(bool(stop))  # a CPU vote: it does not wait for the device
            saving = stops or (settings.save_every and done % settings.save_every == 0 and done < run.total_steps)
            if logged or saving:  # the one read of the loss from the device, and every rank's agreement on it
                loss = all_sum([local_loss.item()], accelerator.device)[0]
                _check_finite(run, loss, done)
            tokens = sum(len(run.rows[i]["input_ids"]) for i in step_rows)
            state.tokens += tokens
            state.train_seconds += time.perf_counter() - step_start
            window_tokens += tokens
            if logged:
                record = {"step": done, "loss": loss, "lr": run.scheduler.get_last_lr()[0],
                          "tokens_per_s": window_tokens / (time.perf_counter() - window_start)}
                if accelerator.is_main_process:
                    append_line(metrics_path, json.dumps(record))
                bar.update(task, loss=loss, lr=record["lr"], tps=record["tokens_per_s"])
                window_tokens, window_start = 0, time.perf_counter()
            bar.update(task, completed=done)
            if saving:
                _save(run, done)
            if stops:
                raise LorafitError(f"stopped at step {done}; checkpoint saved, continue with --resume", exit_code=130)


def finish(run: Run) -> dict:
    """Write the final adapter, evaluate it, and write report.json."""
    files = run.adapter_files()
    if run.accelerator.is_main_process:
        write_folder(run.run_dir / "adapter", files)
    eval_after = _evaluate(run)
    print_eval(run.console, "after training", eval_after)
    tokens = sum(len(row["input_ids"]) for row in run.rows)
    flops = training_flops_per_token(run.model, run.layers, seq_len=round(tokens / len(run.rows)),
                                     supervised_fraction=sum(run.supervised) / tokens)
    report = run_report(run.recipe, run.model, run.accelerator.device, run.total_steps, run.state, eval_after,
                        len(files[WEIGHTS_FILE]), precision=run.precision, flops_per_token=flops)
    report.update(world_size=run.accelerator.num_processes, global_batch=run.steps.global_batch,
                  batch_size=run.recipe.train.batch_size, grad_accum=run.grad_accum)
    if run.ranks is not None:
        report["ranks"] = run.ranks.ranks()
    if run.accelerator.is_main_process:
        write_json(run.run_dir / "report.json", report)
    for table in summary_tables(report, run.run_dir):
        run.console.print(table)
    run.accelerator.wait_for_everyone()
    return report


def prepare_model(
    model: nn.Module, lora: LoraSection, *, gradient_checkpointing: bool = False, compile: bool = False,
    quantize: str = "none",
) -> dict[str, LoRALinear]:
    """Wrap the targets in LoRA layers, freeze the rest, and set up the trunk for a cheap training step."""
    if lora.variant == "adalora":
        layers = inject_adalora(model, lora)
    else:
        layers = inject_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout, init=lora.init,
                             use_rslora=lora.use_rslora)
    if quantize == "nf4":  # after injection, so the adapter describes the original (e.g. Conv1D) modules
        quantize_blocks(model, decoder_blocks(model), stores_transposed)
    fuse_activations(model)
    if gradient_checkpointing:
        enable_checkpointing(model)
    if compile:
        # Block by block, as torchtune does: every block shares one compiled graph, and the loss code
        # that calls the trunk and the head separately stays as it is.
        for block in decoder_blocks(model):
            block.compile()
    return layers


def distribute(accelerator: Accelerator, scorer: SupervisedLoss, settings: TrainSection, total_steps: int):
    """(scorer, optimizer, scheduler) for the launch: DDP, or FSDP2 shards with the optimizer built after them.

    The scheduler is not given to accelerate, which would step it once per process per optimizer step.
    """
    if settings.parallel == "fsdp" and accelerator.num_processes > 1:
        blocks = decoder_blocks(scorer.model)
        scorer = shard_model(scorer, blocks, accelerator.device)
        optimizer, scheduler = build_optimizer(scorer, settings, total_steps)
        return scorer, accelerator.prepare_optimizer(optimizer), scheduler
    optimizer, scheduler = build_optimizer(scorer, settings, total_steps)
    scorer, optimizer = accelerator.prepare(scorer, optimizer)
    return scorer, optimizer, scheduler


def build_optimizer(model: nn.Module, settings: TrainSection, total_steps: int) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW over the trainable parameters and the recipe's learning-rate schedule."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay, foreach=True)
    schedule = partial(lr_factor, warmup=settings.warmup_steps, total=total_steps, schedule=settings.schedule)
    return optimizer, LambdaLR(optimizer, schedule)


def optimizer_step(
    accelerator: Accelerator, scorer: nn.Module, optimizer, scheduler, micro_batches: list[dict], *,
    max_grad_norm: float, supervised: int | None = None, key_dropout: Callable | None = None,
    after_backward: Callable | None = None, after_step: Callable | None = None,
) -> torch.Tensor:
    """One AdamW step over this rank's micro-batches; returns this rank's part of the step's mean token loss.

    The loss stays on the device (a 0-d tensor): reading it would make the host wait for the step to finish.

    Every token of the step weighs alike, whichever rank or micro-batch holds it: each micro-batch's summed
    loss is divided by `supervised`, the supervised tokens of the whole step on all ranks (by default those
    of `micro_batches`). DDP and FSDP average gradients over ranks, so the loss is multiplied by the number
    of processes to make that average a sum. `key_dropout(rows, shape)` keys LoRA dropout by a batch's
    data-set rows (its "rows" entry) before its forward. `after_backward()` may add to the gradients (AdaLoRA's
    penalty) before clipping; `after_step()` sees the updated weights and their gradients (AdaLoRA's pruning).
    """
    if supervised is None:
        supervised = sum(supervised_count(batch["labels"]) for batch in micro_batches)
    scale = accelerator.num_processes / max(supervised, 1)
    total_loss = torch.zeros((), device=accelerator.device)
    for index, batch in enumerate(micro_batches):
        inputs = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items() if k != "rows"}
        if key_dropout is not None:
            key_dropout(batch.get("rows", []), inputs["input_ids"].shape)
        last = index == len(micro_batches) - 1
        with (nullcontext() if last else accelerator.no_sync(scorer)), accelerator.autocast():
            summed = scorer(**inputs)
        accelerator.backward(summed * scale)
        total_loss += summed.detach() / max(supervised, 1)
    if after_backward is not None:
        after_backward()
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(scorer.parameters(), max_grad_norm)
    optimizer.step()
    if after_step is not None:
        after_step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total_loss


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


def _micro_batches(run: Run, step: int) -> tuple[list[int], list[dict]]:
    """(the step's rows, this rank's collated micro-batches), in pinned memory on CUDA for an asynchronous copy."""
    settings, accelerator = run.recipe.train, run.accelerator
    step_rows = run.steps.rows(step)
    share = rank_share(step_rows, accelerator.process_index, accelerator.num_processes, settings.batch_size,
                       run.grad_accum)
    micro = []
    for rows in share:
        batch = collate([run.rows[i] for i in rows], run.tokenizer.pad_token_id)
        if accelerator.device.type == "cuda":
            batch = {key: value.pin_memory() for key, value in batch.items()}
        micro.append({**batch, "rows": rows})
    return step_rows, micro


def _check_finite(run: Run, loss: float, step: int) -> None:
    """A non-finite loss ends the run (exit 1) before it can be logged or saved; every rank sees the same loss."""
    if not math.isfinite(loss):
        last = checkpoint.latest_checkpoint(run.run_dir)
        kept = f"; the last good checkpoint is {last}" if last else ""
        raise LorafitError(f"loss became {loss} at step {step}; lower [train] lr or use float32{kept}", exit_code=1)


def _save(run: Run, step: int) -> None:
    checkpoint.save_checkpoint(run.run_dir, step, run.model, run.optimizer.optimizer, run.scheduler, run.state,
                               run.adapter_files(), write=run.accelerator.is_main_process, scaler=run.accelerator.scaler)
    run.accelerator.wait_for_everyone()  # no rank leaves (and gets the others killed) before the folder is whole


def _evaluate(run: Run) -> dict:
    scorer = run.accelerator.unwrap_model(run.scorer)  # DDP's wrapper is not needed without gradients
    with run.accelerator.autocast():
        return evaluate_split(scorer, run.eval_split, run.recipe.data, run.tokenizer, run.recipe.train.eval_batch_size,
                              rank=run.accelerator.process_index, world=run.accelerator.num_processes)


def _read_metrics(path: Path, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    return [m for m in map(json.loads, path.read_text().splitlines()) if m["step"] <= upto]
