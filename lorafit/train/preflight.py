"""Everything `train` can refuse, checked before the expensive work (tokenizing the data, reading the weights).

The recipe against the model's structure on the meta device (targets, ranks, context length), the label
words against the tokenizer, the output folder, then — in the main process, holding the folder's lock —
what the folder's run allows: a fresh start, a resume from a checkpoint verified from its headers, or
nothing at all because the run is finished.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from rich.console import Console

from lorafit.data.packing import check_packing
from lorafit.data.plan import global_batch_split
from lorafit.data.rows import (
    DEFAULT_EVAL_SPLIT,
    HELD_OUT,
    MissingSplit,
    evaluation_split,
    no_evaluation_reason,
    split_files,
)
from lorafit.data.tasks import label_token_ids
from lorafit.errors import LorafitError
from lorafit.generation.scores import require_sacrebleu
from lorafit.messages import note
from lorafit.model.load import (
    check_context_length,
    check_safetensors,
    decoder_blocks,
    load_config,
    load_tokenizer,
    meta_model,
    own_dropout,
    resolve_precision,
    weights_fingerprint,
)
from lorafit.model.quantize import check_quantizable, require_torchao
from lorafit.recipe import Recipe, TrainSection
from lorafit.report.counts import wrap_with_notes
from lorafit.train import checkpoint, metrics
from lorafit.train.checkpoint import RunState
from lorafit.train.launch import hsdp_shape
from lorafit.train.optimizer import parameter_groups
from lorafit.train.processes import all_gather_objects, make_accelerator
from lorafit.train.resume import check_resume, continue_command, finished_report
from lorafit.train.run_folder import RunLock, check_output


@dataclass
class Checked:
    """What the checks found, for `train.set_up` to build on."""

    accelerator: Accelerator
    console: Console
    precision: tuple[str, str]  # (weights dtype, mixed precision) as resolved for this machine
    grad_accum: int
    tokenizer: object
    state: RunState  # of this launch: model fingerprint, global batch, processes (the data's hash comes later)
    resume_from: Path | None
    finished: dict | None  # the report of a finished run that this recipe would not train further
    checkpointing: bool = False  # [train] gradient_checkpointing, "auto" decided for this device
    refused: str | None = None  # a dry run: why the run folder would refuse this launch (a run raises it)


def check_run(recipe: Recipe, resume: bool, console: Console, held: ExitStack, *, dry_run: bool = False) -> Checked:
    """Check the recipe, the model, the tokenizer and the run folder; the main process locks the folder (the
    lock is released when `held` closes). Nothing is tokenized, loaded or written. A dry run only reads: it takes
    no lock, and what the folder would refuse is returned as `refused` instead of raised."""
    settings, name, remote_code = recipe.train, recipe.model.name, recipe.model.trust_remote_code
    precision = resolve_precision(recipe.model.dtype, settings.mixed_precision)
    metrics.check_settings(settings)
    require_sacrebleu(recipe.eval.metrics)
    accelerator = make_accelerator(precision[1], **metrics.tracker_options(settings, Path(recipe.output.dir)))
    world = accelerator.num_processes
    grad_accum = global_batch_split(settings, world)
    if settings.parallel == "hsdp":
        hsdp_shape(world, settings.shard_size)
    if not accelerator.is_main_process:
        console = Console(quiet=True)
    if world > 1 and not settings.global_batch:
        note(batch_of_processes(settings, world), console)
    run_dir = check_output(recipe.output.dir, name)
    if not resume:  # a resumed run is told in set_up, where its evaluation rows are known
        check_keep_best(recipe, resume=False)
    if evaluation_split(recipe.data) == recipe.data.train_split:
        note(f"evaluation reads the training split {recipe.data.train_split!r}, so its scores are on rows the model "
             "trains on; set [data] eval_split or eval_fraction for held-out scores", console)
    config = load_config(name, trust_remote_code=remote_code)
    check_safetensors(name, allow_pickle=recipe.model.allow_pickle)
    check_context_length(config, recipe.data.max_length)
    kept = own_dropout(config) if recipe.model.dropout == "config" else {}
    if kept:
        note(f"[model] dropout = 'config' keeps the model's own dropout ({', '.join(f'{k} {v:g}' for k, v in kept.items())}), "
             "drawn from torch's random numbers: this run's result depends on its number of processes and on "
             "grad_accum; dropout = 'off' (the default) makes it independent of both", console)
    if recipe.data.packing:
        check_packing(config)
    if recipe.model.quantize != "none":
        require_torchao()
    trainable = check_lora(config, recipe, console)
    checkpointing = choose_checkpointing(recipe, config, device_memory(accelerator.device), world)
    tokenizer = load_tokenizer(name, trust_remote_code=remote_code)
    if recipe.data.task == "classification":
        label_token_ids(recipe.data, tokenizer)
    state = RunState(data_fingerprint="", global_batch=settings.batch_size * grad_accum * world, world_size=world,
                     model_fingerprint=weights_fingerprint(name, config))

    def decide() -> tuple[dict | None, str | None]:
        if not dry_run:
            lock = RunLock(run_dir)
            held.callback(lock.release)
        finished = finished_report(run_dir, recipe) if resume else None
        resume_from = None if finished else check_resume(run_dir, recipe, resume, state)
        if resume_from is not None:
            checkpoint.verify(resume_from, trainable)
        return finished, str(resume_from) if resume_from else None

    refused = None
    try:
        finished, resume_from = on_main(accelerator, decide)
    except LorafitError as refusal:
        if not dry_run:
            raise
        finished, resume_from, refused = None, None, str(refusal)
    if finished is not None:
        steps = finished["throughput"]["steps"]
        note(f"{run_dir} is finished ({steps} steps), nothing to do; to train it longer: "
             f"{continue_command(run_dir)} --set train.max_steps=<more than {steps}>", console)
    return Checked(accelerator, console, precision, grad_accum, tokenizer, state,
                   Path(resume_from) if resume_from else None, finished, checkpointing, refused)


def device_memory(device) -> int | None:
    """Bytes of memory on a CUDA device; None elsewhere (a CPU's memory is not what a step runs out of first)."""
    import torch

    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def choose_checkpointing(recipe: Recipe, config, device_bytes: int | None, world: int = 1) -> bool:
    """[train] gradient_checkpointing as set; "auto" turns it on (and says so) when a micro-batch's estimated
    activations would not fit beside the weights in 90% of the device's memory. Off where that is unknown."""
    settings = recipe.train
    if settings.gradient_checkpointing != "auto":
        return settings.gradient_checkpointing
    if device_bytes is None:
        return False
    from lorafit.model.load import DTYPES, switch_off_dropout
    from lorafit.report.activations import activation_estimate
    from lorafit.report.tables import human_bytes

    dtype, mixed_precision = resolve_precision(recipe.model.dtype, settings.mixed_precision)
    shards = world if settings.parallel != "ddp" else 1  # FSDP2 and HSDP hold a share of the weights (HSDP more)
    weights = sum(p.numel() for p in meta_model(config).parameters()) * DTYPES[dtype].itemsize // shards
    if recipe.model.dropout == "off":
        config = switch_off_dropout(copy.deepcopy(config))
    activations = activation_estimate(config, recipe.lora, rows=settings.batch_size, length=recipe.data.max_length,
                                      dtype=dtype, mixed_precision=mixed_precision)["total"]
    if weights + activations <= 0.9 * device_bytes:
        return False
    note(f"gradient checkpointing on: a micro-batch's activations (about {human_bytes(activations)} for "
         f"{settings.batch_size} rows of up to {recipe.data.max_length} tokens) would not fit beside "
         f"{human_bytes(weights)} of weights in the device's {human_bytes(device_bytes)}; "
         "[train] gradient_checkpointing = false keeps it off")
    return True


def batch_of_processes(settings: TrainSection, world: int) -> str:
    """What a recipe without global_batch means on `world` processes, and the keys that train as one process does."""
    rows = settings.batch_size * settings.grad_accum
    said = (f"{world} processes take batch_size {settings.batch_size} × grad_accum {settings.grad_accum} rows each: "
            f"a global batch of {rows * world} rows a step, {world} times one process's {rows}")
    fits = [size for size in range(settings.batch_size, 0, -1) if rows % (size * world) == 0]
    if not fits:
        return f"{said}; {rows} rows cannot be split over {world} processes, so no global_batch trains as one does"
    keys = [f"global_batch={rows}", *([f"batch_size={fits[0]}"] if fits[0] != settings.batch_size else []),
            *(["grad_accum=1"] if settings.grad_accum != 1 else [])]  # global_batch derives grad_accum
    return (f"{said}; to train as one process does, {' '.join(f'--set train.{key}' for key in keys)} "
            "(or [train] global_batch in the recipe)")


def check_keep_best(recipe: Recipe, resume: bool, evaluation: bool | None = None) -> None:
    """[train] keep_best needs evaluation rows to choose from. `evaluation`: whether the data has them, when
    known; else found from the recipe's files (a hub dataset's splits are known once it is read: None).

    A new run without them is refused; a resumed one (started before this rule) finishes without adapter-best/.
    """
    if not recipe.train.keep_best:
        return
    if evaluation is None:
        evaluation = _has_evaluation(recipe)
    if evaluation is False:
        reason = no_evaluation_reason(recipe.data)
        if resume:
            note(f"[train] keep_best has no evaluation to choose from ({reason}); the run ends without adapter-best/")
            return
        raise LorafitError(f"[train] keep_best needs evaluation rows, and there are none ({reason}); set [data] "
                           "eval_split or eval_fraction, or drop keep_best")


def _has_evaluation(recipe: Recipe) -> bool | None:
    split = evaluation_split(recipe.data)
    if split is None or split == HELD_OUT:
        return split is not None
    try:
        return True if split_files(recipe.data, split) else None
    except MissingSplit:
        return split != DEFAULT_EVAL_SPLIT  # a split the recipe names itself: reading it says it is missing


def check_lora(config, recipe: Recipe, console: Console | None = None) -> dict[str, tuple[int, ...]]:
    """Wrap the targets of the model built on the meta device: {trainable parameter: shape}.

    Refuses targets the model lacks, a rank (the one the variant's layers start at) above a wrapped module's
    smaller side (wrap_with_notes), and 4-bit weights for a model whose experts NF4 cannot store. What the targets leave out is noted on `console`.
    """
    model = meta_model(config)
    lora = recipe.lora
    if recipe.model.quantize != "none":
        check_quantizable(model)
    _, notes = wrap_with_notes(model, lora)  # on the meta device an SVD start draws nothing
    for text in notes:
        note(text, console or Console(stderr=True))
    # compile, FSDP and 4-bit weights work block by block
    if recipe.train.compile or recipe.train.parallel != "ddp" or recipe.model.quantize != "none":
        decoder_blocks(model)

    names = {id(p): name for name, p in model.named_parameters()}
    # in the optimizer's order, which its saved state is indexed by
    return {names[id(p)]: tuple(p.shape) for group in parameter_groups(model, recipe.train) for p in group["params"]}


def on_main(accelerator: Accelerator, decide: Callable[[], object]):
    """`decide()` run by the main process alone; every process gets its result, or raises its error."""
    outcome = None
    if accelerator.is_main_process:
        try:
            outcome = ("ok", decide())
        except LorafitError as error:
            if accelerator.num_processes > 1:
                all_gather_objects(("error", str(error), error.exit_code))
            raise
    outcome = all_gather_objects(outcome)[0]
    if outcome[0] == "error":
        raise LorafitError(outcome[1], exit_code=outcome[2])
    return outcome[1]
