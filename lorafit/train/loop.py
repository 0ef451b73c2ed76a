"""The training loop: recipe -> model + LoRA -> batches -> AdamW steps -> adapter, checkpoints and report.

`train()` reads as four steps: set up, start or resume, run the steps, finish. With several processes
every rank runs the same code on its share of each step's rows; only the main process writes and prints.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lorafit.adapter.export import readiness
from lorafit.adapter.format import WEIGHTS_FILE
from lorafit.adapter.save import adapter_files
from lorafit.data.batches import collate
from lorafit.data.chat import TEMPLATE_FILE, chat_template
from lorafit.data.plan import TrainingPlan, fingerprint, plan_training, rank_share, stream_draw
from lorafit.data.references import PromptGroup
from lorafit.data.rows import no_evaluation_reason
from lorafit.data.tokenize import TokenizedSplit, tokenize_eval, tokenize_split
from lorafit.errors import LorafitError, os_failure
from lorafit.evaluate import evaluate_split
from lorafit.generation.predictions import PREDICTIONS_FILE, eval_prompts, generation_scores
from lorafit.lora.adalora import RankAllocator
from lorafit.lora.linear import LoRALinear
from lorafit.lora.variants import allocator_for
from lorafit.messages import note
from lorafit.model.load import load_model
from lorafit.model.loss import SupervisedLoss
from lorafit.recipe import Recipe, recipe_toml
from lorafit.report.curves import loss_sparkline, save_curves
from lorafit.report.tables import draws_bars, print_eval, print_fitting, progress_bar, summary_tables
from lorafit.report.throughput import run_report, training_flops_per_token
from lorafit.storage import write_atomic, write_folder, write_json
from lorafit.train import checkpoint, metrics
from lorafit.train.checkpoint import RunState
from lorafit.train.metrics import LogWindow, eval_record, improves
from lorafit.train.optimizer import note_long_warmup
from lorafit.train.preflight import Checked, check_keep_best, check_run
from lorafit.train.processes import StopRequest, any_rank, mesh_shape, stop_on_signals
from lorafit.train.resume import check_continuation, eval_rows_changed, how_to_continue, saved_state
from lorafit.train.run_folder import mark
from lorafit.train.step import distribute, prepare_model, train_step


@dataclass
class Run:
    """Everything the loop works on, built once by `set_up`."""

    recipe: Recipe
    console: Console
    accelerator: Accelerator
    tokenizer: object
    plan: TrainingPlan  # the rows (or packed sequences) of every step, read from the tokenized Arrow table
    eval_split: TokenizedSplit | None  # None: the recipe has no evaluation
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
    fitting: dict | None = None  # {"train"/"eval": what fitting the split to max_length did}, for the report
    ranks: RankAllocator | None = None  # AdaLoRA's importance scores and pruning
    prompts: list[PromptGroup] | None = None  # what [eval] metrics generate for

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
        files = adapter_files(self.model, base_model=name, targets=lora.targets, extra={"recipe": self.recipe.model_dump()})
        if self.recipe.data.task == "chat":  # so that inference formats conversations exactly as training did
            files[TEMPLATE_FILE] = chat_template(self.recipe.data, self.tokenizer).encode()
        return files


def train(recipe: Recipe, *, resume: bool = False, console: Console | None = None, changes: list[str] = ()) -> dict:
    """Fine-tune per `recipe`; returns the report that is also written to <run>/report.json. `changes`: what a
    resume changes in the run's recipe (lorafit.train.resume.resume_recipe), printed once every check has passed.

    SIGINT/SIGTERM during the steps stop after the current one and save a checkpoint; in any other phase
    (or a second signal) they stop at once. Either way the exit is 130 with a line that says what is saved.
    """
    with stop_on_signals() as stop, ExitStack() as held:
        try:
            checked = check_run(recipe, resume, console or Console(stderr=True), held)
            if checked.finished is not None:
                return checked.finished
            run = set_up(recipe, checked)
            for line in changes:
                run.console.print(line, markup=False, highlight=False, soft_wrap=True)
            held.callback(metrics.stop_trackers, run.accelerator)
            start_or_resume(run)
            stop.deferred = True
            run_steps(run, stop)
            stop.deferred = False
            return finish(run)
        except KeyboardInterrupt:
            raise LorafitError(f"stopped by a signal; {saved_state(Path(recipe.output.dir), recipe)}",
                               exit_code=130) from None
        except OSError as error:  # the path and cause in words, and what the run keeps
            raise os_failure(error, saved_state(Path(recipe.output.dir), recipe)) from error


def set_up(recipe: Recipe, checked: Checked) -> Run:
    """Tokenize, check the rows against a resumed run, load the model with LoRA, build the optimizer: no file written."""
    settings, accelerator, console, tokenizer = recipe.train, checked.accelerator, checked.console, checked.tokenizer
    set_seed(settings.seed)
    global_batch, bars = checked.state.global_batch, draws_bars(console)
    with accelerator.local_main_process_first():  # one process per machine tokenizes, the others read its cache
        train_split = tokenize_split(recipe.data, tokenizer, recipe.data.train_split, progress=bars,
                                     draw=stream_draw(recipe, global_batch))
        eval_split = tokenize_eval(recipe.data, tokenizer, progress=bars)
    for split in (train_split, eval_split):
        if split is not None:
            print_fitting(console, split)
    if eval_split is None:
        note(f"no evaluation: {no_evaluation_reason(recipe.data)}", console)
    check_keep_best(recipe, checked.resume_from is not None, evaluation=eval_split is not None)
    prompts = eval_prompts(recipe, tokenizer, eval_split, console)
    plan = plan_training(recipe, train_split, global_batch)
    if plan.packed is not None:
        console.print(plan.packed.describe(), markup=False, highlight=False)
    total_steps = plan.total_steps
    note_long_warmup(settings, total_steps, console)
    state = replace(checked.state, data_fingerprint=plan.fingerprint(), total_steps=total_steps,
                    eval_fingerprint=fingerprint(eval_split.columns("digest")["digest"]) if eval_split else "")
    if checked.resume_from is not None:
        check_continuation(checked.resume_from, state, settings.schedule, settings.warmup_steps)

    model = load_model(recipe.model.name, checked.precision[0], trust_remote_code=recipe.model.trust_remote_code,
                       allow_pickle=recipe.model.allow_pickle, dropout=recipe.model.dropout)
    layers = prepare_model(model, recipe.lora, gradient_checkpointing=checked.checkpointing,
                           compile=settings.compile, quantize=recipe.model.quantize, device=accelerator.device)
    ranks = allocator_for(recipe.lora, layers, total_steps)
    scorer = SupervisedLoss(model, settings.label_smoothing)
    scorer, optimizer, scheduler = distribute(accelerator, scorer, settings, total_steps)
    fitting = {role: {"split": split.name, **split.counts()}
               for role, split in (("train", train_split), ("eval", eval_split)) if split is not None}
    return Run(recipe, console, accelerator, tokenizer, plan, eval_split, checked.grad_accum, total_steps, scorer,
               layers, optimizer, scheduler, state, checked.resume_from, checked.precision, fitting=fitting, ranks=ranks,
               prompts=prompts)


def start_or_resume(run: Run) -> None:
    """A fresh run marks its folder and saves its recipe, then evaluates the base; a resumed one restores its
    newest checkpoint (a longer one first saves its new recipe and sets the old report aside)."""
    main = run.accelerator.is_main_process
    if main:
        checkpoint.remove_partial(run.run_dir)
    metrics.start_trackers(run.accelerator, run.recipe)
    if run.resume_from is None:
        if main:
            mark(run.run_dir)
            write_atomic(run.run_dir / "recipe.toml", recipe_toml(run.recipe))
        metrics.restart_metrics(run.accelerator, run.run_dir, 0)
        run.state.eval_before = _evaluate(run)
        print_eval(run.console, "before training", run.state.eval_before)
        if run.recipe.train.eval_every:
            metrics.log(run.accelerator, run.run_dir, eval_record(0, run.state.eval_before))
        return
    run.start_step, saved = checkpoint.load_checkpoint(
        run.resume_from, run.model, run.optimizer.optimizer, run.scheduler, rank=run.accelerator.process_index,
        scaler=run.accelerator.scaler,
    )
    extended = saved.total_steps and saved.total_steps != run.total_steps
    if eval_rows_changed(saved, run.state):  # scores from before this launch are on other rows: said everywhere
        note(f"the evaluation rows differ from those {run.run_dir} started with (max_eval_examples, the data file "
             "or the tokenizer changed); scores from before now (the base model's, keep_best's best) were on the "
             "old rows", run.console)
        saved.eval_before = saved.eval_before and {**saved.eval_before, "rows_changed": True}
    # what is done so far, on this launch's processes and schedule
    run.state = replace(saved, world_size=run.state.world_size, total_steps=run.total_steps,
                        model_fingerprint=run.state.model_fingerprint or saved.model_fingerprint)
    if main and extended:  # until it ends, the folder holds an unfinished run of the new length
        write_atomic(run.run_dir / "recipe.toml", recipe_toml(run.recipe))
        (run.run_dir / "report.json").unlink(missing_ok=True)
    metrics.restart_metrics(run.accelerator, run.run_dir, run.start_step)
    run.console.print(f"resuming from {run.resume_from.name} (step {run.start_step} of {run.total_steps})")


def run_steps(run: Run, stop: StopRequest) -> None:
    """The loop: one optimizer step per iteration, logging, checkpoints, and a stop that every rank agrees on."""
    settings, state, accelerator = run.recipe.train, run.state, run.accelerator
    run.scorer.train()
    if accelerator.device.type == "cuda":  # report.json's peak is the steps', not loading's or evaluation's
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    with progress_bar(run.console) as bar, ThreadPoolExecutor(1) as prefetch:
        task = bar.add_task("training", total=run.total_steps, completed=run.start_step, loss=float("nan"), lr=0.0, tps=0.0)
        window = LogWindow(accelerator.device)
        window.restore(state.log_window, accelerator.is_main_process)
        upcoming = prefetch.submit(_micro_batches, run, run.start_step)
        for step in range(run.start_step, run.total_steps):
            step_start = time.perf_counter()
            step_rows, micro = upcoming.result()
            if step + 1 < run.total_steps:  # collate the next step while this one runs
                upcoming = prefetch.submit(_micro_batches, run, step + 1)
            local_loss, grad_norm = train_step(
                accelerator, run.scorer, run.optimizer, run.scheduler, micro, step=step,
                max_grad_norm=settings.max_grad_norm, supervised=int(run.plan.supervised[step_rows].sum()),
                layers=run.layers.values(), seed=settings.seed, ranks=run.ranks,
            )
            done = step + 1
            # a run of one log window also logs its first step, so that its loss has a start and an end
            logged = (done % settings.log_every == 0 or done == run.total_steps
                      or (done == 1 and run.total_steps <= settings.log_every))
            stops = any_rank(bool(stop))  # a CPU vote: it does not wait for the device
            # the last step's state is always kept: a finished run can be trained longer from it
            saving = stops or done == run.total_steps or (settings.save_every and done % settings.save_every == 0)
            tokens = int(run.plan.lengths[step_rows].sum())
            state.tokens += tokens
            state.train_seconds += time.perf_counter() - step_start
            window.add(local_loss, grad_norm, tokens)
            if logged or saving:  # the one read of the loss from the device, and every rank's agreement on it
                loss = window.mean_loss()
                _check_finite(run, loss, done)
            if logged:
                record = window.record(done, loss, run.scheduler.get_last_lr()[0], clipped=settings.max_grad_norm > 0)
                metrics.log(accelerator, run.run_dir, record)
                bar.update(task, loss=loss, lr=record["lr"], tps=record["tokens_per_s"])
            bar.update(task, completed=done)
            if settings.eval_every and done % settings.eval_every == 0 and done < run.total_steps:
                _evaluate_at(run, done)
            if saving:
                state.log_window = window.saved()
                _save(run, done)
            if stops:
                raise LorafitError(f"stopped at step {done}; checkpoint saved, {how_to_continue(run.recipe)}",
                                   exit_code=130)


def finish(run: Run) -> dict:
    """Write the final adapter, evaluate it, and write report.json."""
    files = run.adapter_files()
    if run.accelerator.is_main_process:
        write_folder(run.run_dir / "adapter", files)
    eval_after = _evaluate(run)
    print_eval(run.console, "after training", eval_after)
    if run.recipe.train.eval_every:
        _evaluate_at(run, run.total_steps, eval_after, files)
    plan = run.plan
    tokens = int(plan.lengths.sum())
    rows = len(plan.digests)  # attention's useful length is a row's, packed or not
    flops = training_flops_per_token(run.model, run.layers, seq_len=round(tokens / rows),
                                     supervised_fraction=int(plan.supervised.sum()) / tokens)
    report = run_report(run.recipe, run.model, run.accelerator.device, run.total_steps, run.state, eval_after,
                        len(files[WEIGHTS_FILE]), precision=run.precision, flops_per_token=flops,
                        processes=run.accelerator.num_processes)
    report.update(world_size=run.accelerator.num_processes, global_batch=plan.steps.global_batch,
                  batch_size=run.recipe.train.batch_size, grad_accum=run.grad_accum,
                  data=run.fitting)
    if mesh := mesh_shape(run.model):  # FSDP2 or HSDP: how the model was sharded and replicated
        report["mesh"] = mesh
    if plan.packed is not None:
        report["packing"] = plan.packed.summary()
    if run.ranks is not None:
        report["ranks"] = run.ranks.ranks()
    if run.state.best:
        report["eval"]["best"] = run.state.best
    history = []
    if run.accelerator.is_main_process:
        write_json(run.run_dir / "report.json", report)
        history = metrics.read_metrics(run.run_dir)
        try:
            save_curves(history, run.run_dir / "curves.png", run.console)
        except OSError as error:  # the run itself is complete: a missing picture does not fail it
            note(str(os_failure(error, "the run is complete without curves.png")), run.console)
    for table in summary_tables(report, run.run_dir, loss_curve=loss_sparkline(history)):
        run.console.print(table)
    if run.accelerator.is_main_process:
        run.console.print(readiness(run.run_dir / "adapter", run.model.config), highlight=False, soft_wrap=True)
    run.accelerator.wait_for_everyone()
    return report


def _micro_batches(run: Run, step: int) -> tuple[list[int], list[dict]]:
    """(the step's rows, this rank's collated micro-batches), in pinned memory on CUDA for an asynchronous copy."""
    settings, accelerator = run.recipe.train, run.accelerator
    step_rows = run.plan.steps.rows(step)
    share = rank_share(step_rows, accelerator.process_index, accelerator.num_processes, settings.batch_size,
                       run.grad_accum)
    micro = []
    for rows in share:
        batch = collate(run.plan.units(rows), run.tokenizer.pad_token_id)
        if accelerator.device.type == "cuda":
            batch = {key: value.pin_memory() for key, value in batch.items()}
        micro.append({**batch, "rows": rows})
    return step_rows, micro


def _check_finite(run: Run, loss: float, step: int) -> None:
    """A non-finite loss ends the run (exit 1) before it can be logged or saved; every rank sees the same loss."""
    if not math.isfinite(loss):
        raise checkpoint.diverged(run.run_dir, f"loss became {loss} at step {step}")


def _save(run: Run, step: int) -> None:
    checkpoint.save_checkpoint(run.run_dir, step, run.model, run.optimizer.optimizer, run.scheduler, run.state,
                               run.adapter_files(), write=run.accelerator.is_main_process, scaler=run.accelerator.scaler)
    run.accelerator.wait_for_everyone()  # no rank leaves (and gets the others killed) before the folder is whole


def _evaluate_at(run: Run, step: int, result: dict | None = None, files: dict | None = None) -> None:
    """[train] eval_every: log the eval scores at `step`; with keep_best, keep the adapter as adapter-best/ when
    they beat the best so far. `result` and `files` are passed when the caller already has them."""
    if result is None:
        result = _evaluate(run)
        print_eval(run.console, f"at step {step}", result)
    metrics.log(run.accelerator, run.run_dir, eval_record(step, result))
    if run.recipe.train.keep_best and run.eval_split is not None and improves(result, run.state.best):
        files = files or run.adapter_files()  # a collective under FSDP2: every rank is here
        if run.accelerator.is_main_process:
            write_folder(run.run_dir / "adapter-best", files)
        run.state.best = {"step": step, **result}


def _evaluate(run: Run) -> dict:
    if run.eval_split is None:
        return {"examples": 0, "skipped": no_evaluation_reason(run.recipe.data)}
    scorer = run.accelerator.unwrap_model(run.scorer)  # DDP's wrapper is not needed without gradients
    rank, world = run.accelerator.process_index, run.accelerator.num_processes
    with run.accelerator.autocast():
        result = evaluate_split(scorer, run.eval_split, run.recipe.data, run.tokenizer, run.recipe.train.eval_batch_size,
                                rank=rank, world=world)
        if run.prompts is not None:  # [eval] metrics: generate, score, and write the latest predictions
            predictions = run.run_dir / PREDICTIONS_FILE if run.accelerator.is_main_process else None
            result.update(generation_scores(scorer, run.tokenizer, run.prompts, run.recipe, rank=rank, world=world,
                                            write_to=predictions))
    return result
