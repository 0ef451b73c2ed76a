"""`--dry-run`: everything a run does before its first step, shown and then stopped; nothing is written.

The model is built on the meta device from its config (no weights are read), the data is tokenized exactly
as training tokenizes it, and the first rows are printed with their supervised tokens marked, so a wrong
template or label mask is seen before any compute is spent on it.
"""

from __future__ import annotations

import itertools
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from lorafit.data.plan import plan_training, stream_draw
from lorafit.data.rows import no_evaluation_rows
from lorafit.data.tasks import IGNORE
from lorafit.data.tokenize import TokenizedSplit, tokenize_eval, tokenize_split
from lorafit.recipe import Recipe, recipe_toml
from lorafit.report.tables import draws_bars
from lorafit.train.optimizer import note_long_warmup

SAMPLE_ROWS = 3
MARKS = ("[[", "]]")  # around supervised tokens where the console has no colour


def dry_run(recipe: Recipe, console: Console, *, resume: bool = False, eval_split: str | None = None,
            adapter: Path | None = None, model_dir: Path | None = None, changes: list[str] = ()) -> dict:
    """What `train` (or, given `eval_split`, `eval`) would do with `recipe`: printed to `console` and returned.
    `changes`: what a resume changes in the run's recipe (lorafit.train.resume.resume_recipe).

    The same checks as the real command run first, so a dry run refuses what the run would refuse.
    """
    from lorafit.model.load import load_tokenizer, resolve_precision

    training = eval_split is None
    checked = None
    if training:  # train's own checks, run folder and resume included (what the folder refuses is described)
        from lorafit.train.preflight import check_run

        with ExitStack() as held:
            checked = check_run(recipe, resume, console, held, dry_run=True)
    name = str(model_dir) if model_dir is not None else recipe.model.name
    weights, mixed_precision = resolve_precision(recipe.model.dtype, recipe.train.mixed_precision)
    model = model_table(recipe, name, adapter)
    tokenizer = load_tokenizer(name, trust_remote_code=recipe.model.trust_remote_code)
    bars = draws_bars(console)
    splits = {recipe.data.train_split: tokenize_split(recipe.data, tokenizer, recipe.data.train_split, progress=bars,
                                                      draw=stream_draw(recipe, checked.state.global_batch))
              } if training else {}
    held_out = tokenize_eval(recipe.data, tokenizer, None if training else eval_split or None, progress=bars)
    if held_out is not None:  # evaluating on the training split: that split twice, as training and as evaluation
        splits[f"{held_out.name} (evaluation)" if held_out.name in splits else held_out.name] = held_out
    elif not training:
        raise no_evaluation_rows(recipe.data)
    if training:
        from lorafit.train.preflight import check_keep_best

        check_keep_best(recipe, resume, evaluation=held_out is not None)
    names = list(splits)
    result = {
        "recipe": recipe.model_dump(exclude_none=True),
        "model": model,
        "precision": {"dtype": weights, "mixed_precision": mixed_precision},
        "data": {split: split_summary(tokenized, recipe.data.max_length) for split, tokenized in splits.items()},
    }
    first = splits[names[0]].examples
    samples = [first[i] for i in range(min(SAMPLE_ROWS, len(first)))]
    result["samples"] = [{"tokens": len(row["input_ids"]), "text": marked_row(row, tokenizer, colour=False).plain}
                         for row in samples]
    if training:
        from lorafit.report.activations import recipe_activations

        result["model"]["memory"]["activations"] = recipe_activations(recipe)
        result["plan"] = {**training_plan(recipe, splits[recipe.data.train_split], checked),
                          "resume_changes": list(changes)}
    show(console, recipe, result, [marked_row(row, tokenizer, colour=has_colour(console)) for row in samples])
    return result


def model_table(recipe: Recipe, name: str, adapter: Path | None) -> dict:
    """The parameter and memory report of model `name` with the recipe's LoRA, from the config on the meta device;
    an adapter to evaluate is checked against the same model (its weights are not read either)."""
    from lorafit.report.counts import describe

    if adapter is not None:
        from lorafit.adapter.load import check_adapter
        from lorafit.model.load import load_config

        check_adapter(load_config(name, trust_remote_code=recipe.model.trust_remote_code), Path(adapter))
    return describe(recipe, name)


def split_summary(split: TokenizedSplit, max_length: int) -> dict:
    """Rows kept, every count the data module keeps about a split (total, dropped, ...), lengths, supervised tokens."""
    columns = split.columns("length", "supervised")
    lengths = columns["length"]
    percentiles = np.percentile(lengths, [50, 90, 99]).round().astype(int).tolist()
    return {
        **split.counts(),
        "at_max_length": int((lengths == max_length).sum()),  # cut there, or exactly that long
        "tokens": int(lengths.sum()),
        "supervised_tokens": int(columns["supervised"].sum()),
        "length": {"min": int(lengths.min()), "p50": percentiles[0], "p90": percentiles[1], "p99": percentiles[2],
                   "max": int(lengths.max())},
    }


def training_plan(recipe: Recipe, train: TokenizedSplit, checked) -> dict:
    """Steps (train's own planner, packing included), global batch and the run folder's fate, as train's checks
    (lorafit.train.preflight.check_run) found them."""
    plan = plan_training(recipe, train, checked.state.global_batch)
    note_long_warmup(recipe.train, plan.total_steps, checked.console)
    return {
        "steps": plan.total_steps,
        "steps_per_epoch": plan.steps.steps_per_epoch,
        "packing": plan.packed.summary() if plan.packed is not None else None,
        "global_batch": plan.steps.global_batch,
        "batch_size": recipe.train.batch_size,
        "grad_accum": checked.grad_accum,
        "world_size": checked.state.world_size,
        "output_dir": recipe.output.dir,
        "resume_from": str(checked.resume_from) if checked.resume_from else None,
        "gradient_checkpointing": checked.checkpointing,
        "finished": checked.finished is not None,  # a finished run that --resume leaves as it is
        "refused": checked.refused,  # why train would refuse the run folder, or None
    }


def marked_row(row: dict, tokenizer, *, colour: bool) -> Text:
    """A tokenized row decoded, its supervised tokens (labels not IGNORE) in colour or between [[ and ]]."""
    text = Text()
    pairs = zip(row["input_ids"], row["labels"])
    for supervised, run in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE):
        piece = tokenizer.decode([token for token, _ in run])
        if not supervised:
            text.append(piece, style="dim" if colour else None)
        elif colour:
            text.append(piece, style="bold black on green")
        else:
            text.append(f"{MARKS[0]}{piece}{MARKS[1]}")
    return text


def has_colour(console: Console) -> bool:
    return console.color_system is not None and not console.no_color


def show(console: Console, recipe: Recipe, result: dict, rows: list[Text]) -> None:
    from lorafit.report.tables import human_bytes, info_tables

    console.rule("resolved recipe")
    console.print(recipe_toml(recipe), markup=False, highlight=False)
    console.rule("model")
    console.print(f"{result['model']['model']} ({result['model']['model_type']}); weights "
                  f"{result['precision']['dtype']}, mixed precision {result['precision']['mixed_precision']}",
                  markup=False, highlight=False)
    for table in info_tables(result["model"]):
        console.print(table)
    console.print(data_table(result["data"]))
    how = "highlighted" if has_colour(console) else f"between {MARKS[0]} and {MARKS[1]}"
    console.rule(f"first rows as tokenized (supervised tokens {how})")
    for index, (row, sample) in enumerate(zip(rows, result["samples"]), start=1):
        console.print(Text(f"row {index} ({sample['tokens']} tokens): ", style="bold") + row)
    plan = result.get("plan")
    if plan:
        memory = result["model"]["memory"]["lora_estimate"]["total"]
        activations = result["model"]["memory"]["activations"]
        checkpointing = plan["gradient_checkpointing"]
        start = (f"train would refuse: {plan['refused']}" if plan["refused"] else
                 "nothing to do: the run there is finished" if plan["finished"] else
                 f"resume from {Path(plan['resume_from']).name}" if plan["resume_from"] else "a new run")
        console.rule("plan")
        console.print(
            f"{plan['steps']:,} steps ({plan['steps_per_epoch']:,} per epoch) of {plan['global_batch']} "
            f"{'packed sequences' if plan['packing'] else 'rows'} "
            f"(batch_size {plan['batch_size']} × grad_accum {plan['grad_accum']} × {plan['world_size']} processes); "
            f"static memory estimate {human_bytes(memory)}, activations about "
            f"{human_bytes(activations['checkpointed' if checkpointing else 'total'])} per micro-batch (gradient "
            f"checkpointing {'on' if checkpointing else 'off'}); in {plan['output_dir']}: {start}",
            markup=False, highlight=False,
        )
        for line in plan["resume_changes"]:
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print("dry run: nothing was trained or written", style="bold")


def data_table(data: dict) -> Table:
    """One column per split; every count the data module keeps (rows shortened, ...) gets a row of its own."""
    table = Table(title="Data (after tokenizing)")
    table.add_column("")
    for split in data:
        table.add_column(escape(split), justify="right")
    names = {"rows": "rows read", "examples": "examples (rows, or windows of long documents)",
             "shortened": "rows shortened, supervision kept", "cut": "rows that lost supervised tokens",
             "cut_tokens": "supervised tokens lost", "windowed": "documents split into windows",
             "dropped": "rows left out (nothing to predict)", "at_max_length": "examples at max_length",
             "tokens": "tokens", "supervised_tokens": "supervised tokens"}
    keys = list(names) + sorted({key for summary in data.values() for key in summary} - set(names) - {"length"})
    for key in keys:
        table.add_row(names.get(key, key.replace("_", " ")), *(f"{summary.get(key, 0):,}" for summary in data.values()))
    table.add_row("length min / p50 / p90 / p99 / max", *(" / ".join(map(str, summary["length"].values()))
                                                   for summary in data.values()))
    return table
