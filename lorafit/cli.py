"""The `lorafit` command line: each command parses, calls one library function, and prints."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from lorafit.errors import LorafitError
from lorafit.launch import rank

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune Hugging Face causal language models with LoRA.",
)
stderr = Console(stderr=True)

Debug = Annotated[bool, typer.Option("--debug", help="Show library logs and full tracebacks.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else there.")]
RecipePath = Annotated[Path, typer.Option("--recipe", "-r", help="Recipe TOML file.")]


def _quiet_libraries() -> None:
    """Keep transformers/datasets warnings and loading bars off the screen."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    from lorafit.quantize import quiet_torchao

    quiet_torchao()  # transformers imports torchao wherever it is installed
    import datasets
    import huggingface_hub
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def _run(action: Callable[[], object], debug: bool) -> object:
    """Turn LorafitError into one line and an exit code; anything else is a runtime failure (exit 1).

    With several processes every rank meets the same bad input, so only the main one says so; a failure
    of one rank alone is printed by that rank, with its number.
    """
    if not debug:
        _quiet_libraries()
    try:
        return action()
    except LorafitError as error:
        if debug:
            stderr.print_exception()
        if rank() == 0:
            stderr.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None
    except Exception as error:  # noqa: BLE001 - the last line of defence, so users see one line
        if debug:
            stderr.print_exception()
        else:
            where = f"rank {rank()}: " if rank() else ""
            stderr.print(
                f"[bold red]error:[/] {where}{type(error).__name__}: {escape(str(error))} (run again with --debug for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(1) from None


def _start_missing_processes() -> None:
    """Under `accelerate launch --num_processes N` without GPUs, become the N processes it meant to start."""
    from lorafit.launch import relaunch_command

    command = _run(lambda: relaunch_command(sys.argv[1:]), debug=False)
    if command:
        stderr.print(f"[yellow]note:[/] accelerate started one process without GPUs; starting {command[3].split('=')[1]} processes "
                     "through torch.distributed.run", highlight=False)
        os.execv(command[0], command)


def _print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command()
def train(
    recipe: RecipePath,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Run folder (overrides [output] dir).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")] = False,
    overrides: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a recipe key: section.key=value (repeatable).")
    ] = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Fine-tune with LoRA as the recipe says; writes the adapter, checkpoints and report.json.

    Ctrl-C or SIGTERM stops after the current step, saves a checkpoint and exits with code 130;
    continue with --resume. A second Ctrl-C stops at once.
    """

    _start_missing_processes()

    def action():
        from lorafit.recipe import load_recipe
        from lorafit.train import train as run_training

        settings = list(overrides or [])
        if output is not None:
            settings.append(f"output.dir={json.dumps(str(output))}")
        return run_training(load_recipe(recipe, settings), resume=resume, console=stderr if as_json else Console())

    report = _run(action, debug)
    if as_json and rank() == 0:
        _print_json(report)


@app.command("eval")
def evaluate(
    recipe: RecipePath,
    adapter: Annotated[Optional[Path], typer.Option("--adapter", help="Adapter folder to apply to the base.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="A full (e.g. merged) model folder instead.")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Data split (default: [data] eval_split).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key.")] = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Loss, perplexity and (for classification) label accuracy of the base, an adapter, or a merged model."""

    def action():
        from lorafit.evaluate import evaluate_recipe
        from lorafit.recipe import load_recipe

        if adapter is not None and model is not None:
            raise LorafitError("give --adapter or --model, not both")
        return evaluate_recipe(load_recipe(recipe, list(overrides or [])), adapter=adapter, model_dir=model, split=split)

    result = _run(action, debug)
    if rank() != 0:  # every process computed the same numbers; one prints them
        return
    if as_json:
        _print_json({"eval": result})
    else:
        from lorafit.report import eval_table

        Console().print(eval_table(result))


@app.command()
def merge(
    base: Annotated[str, typer.Argument(help="Base model: hub id or local folder.")],
    adapter: Annotated[Path, typer.Argument(help="Adapter folder (PEFT LoRA format).")],
    out: Annotated[Path, typer.Argument(help="Folder to write the merged model to.")],
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Fold an adapter into its base and save a plain Hugging Face model."""

    def action():
        from lorafit.merge import merge_adapter

        return merge_adapter(base, adapter, out, force=force)

    result = _run(action, debug)
    if as_json:
        _print_json(result)
    else:
        Console().print(
            f"merged {result['adapter']} into {result['base']} -> [bold]{result['out']}[/]\n"
            f"largest |logit difference| merged vs. unmerged on {result['probe_tokens']} probe tokens: "
            f"{result['max_logit_diff']:.3g}",
            highlight=False,
        )
        for note in result.get("notes", []):
            stderr.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


@app.command()
def info(
    recipe: Annotated[Optional[Path], typer.Option("--recipe", "-r", help="Take model and LoRA settings from a recipe.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id or local model folder.")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", min=1, help="LoRA rank r (default 8).")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", min=0.0, help="LoRA alpha (default 16).")] = None,
    targets: Annotated[Optional[str], typer.Option("--targets", help="Comma-separated targets, e.g. q,v.")] = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Trainable parameters, adapter size and memory estimates; reads only the model's config."""

    def action():
        from lorafit.recipe import LoraSection, ModelSection, load_recipe
        from lorafit.report import describe

        if (recipe is None) == (model is None):
            raise LorafitError("give exactly one of --recipe PATH or --model ID_OR_DIR")
        if recipe is not None:
            chosen = load_recipe(recipe)
            model_section, lora = chosen.model, chosen.lora
        else:
            model_section, lora = ModelSection(name=model), LoraSection()
        return describe(
            model_section.name,
            rank=rank or lora.rank,
            alpha=alpha if alpha is not None else lora.alpha,
            targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else lora.targets,
            dtype=model_section.dtype,
            quantize=model_section.quantize,
        )

    report = _run(action, debug)
    if as_json:
        _print_json(report)
    else:
        from lorafit.report import info_tables

        console = Console()
        console.print(f"[bold]{report['model']}[/] ({report['model_type']})", highlight=False)
        for table in info_tables(report):
            console.print(table)


if __name__ == "__main__":
    app()
