"""The `lorafit` command line: each command parses, calls one library function, and prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from lorafit.cli.options import (
    AdapterDir,
    AsJson,
    Commands,
    Debug,
    DryRun,
    ModelDir,
    Overrides,
    RecipePath,
    RunRecipePath,
    comma_list,
    global_options,
    one_model,
    start_missing_processes,
)
from lorafit.errors import LorafitError
from lorafit.messages import error, note, print_json, run_command, stderr
from lorafit.train.launch import rank

app = typer.Typer(
    cls=Commands,
    callback=global_options,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain text, so that "[output] dir" is not read as markup
    help="Fine-tune Hugging Face causal language models with LoRA.",
)


@app.command()
def train(
    recipe: RunRecipePath = None,
    # a str, not a Path: Path("") would turn an empty --output (an unset variable) into the current folder
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Run folder (overrides [output] dir).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")] = False,
    overrides: Overrides = None,
    dry_run: DryRun = False,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Fine-tune with LoRA as the recipe says; writes the adapter, checkpoints and report.json.

    Ctrl-C or SIGTERM stops after the current step, saves a checkpoint and exits with code 130;
    continue with `lorafit train --resume -o DIR`, which takes the run's own recipe. A second Ctrl-C stops at once.
    """

    if not dry_run:
        start_missing_processes()

    def action():
        from lorafit.train.loop import train as run_training
        from lorafit.train.resume import train_recipe

        settings = list(overrides or [])
        if output is not None:
            settings.append(f"output.dir={json.dumps(output)}")
        console = stderr if as_json else Console()
        chosen, changes = train_recipe(recipe, settings, resume)
        if dry_run:
            from lorafit.dryrun import dry_run as show_plan

            return show_plan(chosen, console, resume=resume, changes=changes)
        report = run_training(chosen, resume=resume, console=console, changes=changes)
        return {"run_dir": chosen.output.dir, "adapter": str(Path(chosen.output.dir) / "adapter"), **report}

    result = run_command(action, debug)
    if as_json:
        print_json("train", result)


@app.command("eval")
def evaluate(
    recipe: RecipePath,
    adapter: AdapterDir = None,
    model: ModelDir = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Data split (default: [data] eval_split).")] = None,
    predictions: Annotated[Optional[Path], typer.Option(
        "--predictions", help="With [eval] metrics: write each prompt's prediction and references to this .jsonl.")
    ] = None,
    overrides: Overrides = None,
    dry_run: DryRun = False,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Loss, perplexity, label accuracy (classification) or generation metrics ([eval] metrics) of the base, an
    adapter, or a merged model."""

    def action():
        from lorafit.evaluate import evaluate_recipe
        from lorafit.recipe import load_recipe

        one_model(adapter, model)
        chosen = load_recipe(recipe, list(overrides or []))
        if dry_run:
            from lorafit.dryrun import dry_run as show_plan

            return show_plan(chosen, stderr if as_json else Console(), eval_split=split or chosen.data.eval_split,
                             adapter=adapter, model_dir=model)
        scores = evaluate_recipe(chosen, adapter=adapter, model_dir=model, split=split, predictions=predictions)
        return {"model": str(model) if model is not None else chosen.model.name,
                "adapter": str(adapter) if adapter is not None else None,
                "split": split or chosen.data.eval_split, "eval": scores}

    result = run_command(action, debug)
    if as_json:
        print_json("eval", result)
    elif not dry_run and rank() == 0:  # every process computed the same numbers; one prints them
        from lorafit.report.tables import eval_table

        Console().print(eval_table(result["eval"]))


@app.command()
def generate(
    recipe: RecipePath,
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Prompt text(s): what fills the recipe's template.")] = None,
    adapter: AdapterDir = None,
    model: ModelDir = None,
    prompts_file: Annotated[
        Optional[Path], typer.Option("--prompts", help="File of prompts: one per line, or .jsonl rows with the input field.")
    ] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        "--max-new-tokens", min=1, help="Most tokens to add per prompt (default: [eval] max_new_tokens if set, else 128).")
    ] = None,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy; above 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Sample from this probability mass.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling (each prompt starts from it).")] = 0,
    num_beams: Annotated[Optional[int], typer.Option(
        "--num-beams", min=1, help="Beam search with this many beams (default: [eval] num_beams).")] = None,
    length_penalty: Annotated[Optional[float], typer.Option(
        "--length-penalty", help="Beams ranked by log-probability / length ** this (default: [eval] length_penalty).")
    ] = None,
    no_repeat_ngram_size: Annotated[Optional[int], typer.Option(
        "--no-repeat-ngram-size", min=0, help="Never repeat an n-gram of this size (default: [eval] no_repeat_ngram_size).")
    ] = None,
    stop: Annotated[Optional[list[str]], typer.Option(
        "--stop", help="End a completion before this text (repeatable; default: [eval] stop).")] = None,
    overrides: Overrides = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Complete prompts with the recipe's template, streaming the text; classification prints label and probability."""
    from lorafit.generate import prompt_header

    out = Console(highlight=False, soft_wrap=True)
    given: list = list(prompts or [])
    started: set[int] = set()

    def show(index: int, text: str, done: bool) -> None:
        """Stream a completion to stdout; with several prompts, each is first named on stderr."""
        if as_json:
            return
        if index not in started and len(given) > 1:
            header = escape(prompt_header(given[index]))  # its fields as "field: value"
            stderr.print(f"[dim]── {index + 1}: {header}[/]", highlight=False, soft_wrap=True)
        started.add(index)
        out.print(escape(text), end="\n" if done else "")

    def action():
        from lorafit.generate import generate as run_generation
        from lorafit.generate import read_prompts, recipe_decoding
        from lorafit.recipe import load_recipe

        one_model(adapter, model)
        chosen = load_recipe(recipe, list(overrides or []))
        given.extend(read_prompts(prompts_file) if prompts_file is not None else [])
        decoding = recipe_decoding(chosen, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   seed=seed, num_beams=num_beams, length_penalty=length_penalty,
                                   no_repeat_ngram_size=no_repeat_ngram_size, stop=tuple(stop) if stop else None)
        return run_generation(chosen, given, adapter=adapter, model_dir=model, decoding=decoding, stream=show)

    results = run_command(action, debug)
    if as_json:
        print_json("generate", {"completions": results})
        return
    for result in results:
        if "label" in result:
            out.print(f"{escape(result['label'])}  {result['probability']:.3f}  {escape(prompt_header(result['prompt']))}")


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
        from lorafit.adapter.merge import merge_adapter

        return merge_adapter(base, adapter, out, force=force)

    result = run_command(action, debug)
    if as_json:
        print_json("merge", result)
    else:
        Console().print(
            f"merged {escape(result['adapter'])} into {escape(result['base'])} -> [bold]{escape(result['out'])}[/]\n"
            f"largest |logit difference| merged vs. unmerged on {result['probe_tokens']} probe tokens: "
            f"{result['max_logit_diff']:.3g}", highlight=False)
        for text in result.get("notes", []):
            note(text)


@app.command()
def export(
    adapter: Annotated[Path, typer.Argument(help="Adapter folder (PEFT LoRA format).")],
    engine: Annotated[str, typer.Option("--for", help="Serving engine: vllm, sglang, llamacpp or peft.")],
    out: Annotated[Optional[Path], typer.Argument(help="Folder to write what the engine loads to.")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model folder: its config (llamacpp), "
                                                "tokenizer (end of turn) and weights (a merged model).")] = None,
    check_only: Annotated[bool, typer.Option("--check-only", help="Check the adapter; write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Check an adapter against a serving engine's rules and write what it loads (GGUF for llama.cpp)."""

    def action():
        from lorafit.adapter.export import export_adapter

        return export_adapter(adapter, engine, out, base=base, check_only=check_only, force=force)

    result = run_command(action, debug)
    if as_json:
        print_json("export", result)
    else:
        for problem in result["problems"]:
            blocking = problem["level"] == "refuse" or (result["refused"] and problem["level"] == "merge")
            (error if blocking else note)(f"{result['engine']}: {problem['text']}")
        if result["written"]:
            Console().print(f"wrote {result['written']} for {result['engine']} -> [bold]{result['out']}[/]\n"
                            f"serve: {result['serve']}", highlight=False, soft_wrap=True)
        elif not result["refused"]:
            Console().print(f"{result['engine']}: "
                            f"{'ready as written' if result['ready_as_written'] else 'export writes what it loads'}")
    if result["refused"]:
        raise typer.Exit(2)


@app.command()
def info(
    recipe: Annotated[Optional[Path], typer.Option("--recipe", "-r", help="Take model and LoRA settings from a recipe.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id or local model folder.")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="LoRA rank r (default: [lora] rank, else 8).")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="LoRA alpha (default: [lora] alpha, else 16).")] = None,
    targets: Annotated[
        Optional[str], typer.Option("--targets", help="Comma-separated targets, e.g. q,v or all-linear.")
    ] = None,
    variant: Annotated[
        Optional[str], typer.Option("--variant", help="lora, dora or adalora (default: [lora] variant, else lora).")
    ] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option("--dtype", help="Base weights for the memory estimate: auto, float32, bfloat16 or float16 "
                                     "(default: [model] dtype, else auto)."),
    ] = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Trainable parameters, adapter size and memory estimates; reads only the model's config."""

    def action():
        from lorafit.recipe import load_recipe, validate
        from lorafit.report.activations import recipe_activations
        from lorafit.report.counts import describe

        if (recipe is None) == (model is None):
            raise LorafitError("give exactly one of --recipe PATH or --model ID_OR_DIR")
        raw = load_recipe(recipe).model_dump() if recipe is not None else {"model": {"name": model}}
        given = {"rank": rank, "alpha": alpha, "variant": variant,
                 "targets": comma_list(targets) if targets is not None else None}
        raw.setdefault("lora", {}).update({key: value for key, value in given.items() if value is not None})
        if dtype is not None:
            raw["model"]["dtype"] = dtype
        chosen = validate(raw, where="lorafit info")  # the recipe's own rules: what a recipe refuses, info refuses
        described = describe(chosen)
        described["memory"]["activations"] = recipe_activations(chosen)
        return described

    report = run_command(action, debug)
    if as_json:
        print_json("info", report)
    else:
        from lorafit.report.tables import info_tables

        console = Console()
        console.print(f"[bold]{escape(report['model'])}[/] ({report['model_type']}, {report['dtype']} weights)",
                      highlight=False)
        for table in info_tables(report):
            console.print(table)
        for text in report["notes"]:
            note(text)


@app.command()
def sweep(
    recipe: RecipePath,
    ranks: Annotated[Optional[str], typer.Option("--ranks", help="LoRA ranks to train, e.g. 1,2,4,8,16.")] = None,
    key: Annotated[Optional[str], typer.Option("--key", help="Any recipe key to sweep instead, e.g. lora.alpha.")] = None,
    values: Annotated[Optional[str], typer.Option("--values", help="Its values, comma-separated, e.g. 8,16,32.")] = None,
    targets: Annotated[Optional[str], typer.Option("--targets", help="LoRA targets for every run, e.g. q,v.")] = None,
    overrides: Annotated[
        Optional[list[str]], typer.Option("--set", metavar="SECTION.KEY=VALUE", help="Override a recipe key in every run.")
    ] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Sweep folder (default: [output] dir + -sweep).")] = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """One run per value in its own sub-folder, then a table, sweep.json and sweep.png. Run it again to resume:
    finished runs are kept and an interrupted one continues from its checkpoint."""

    def action():
        from lorafit.sweep import sweep as run_sweep

        if (ranks is None) == (key is None) or (key is None) != (values is None):
            raise LorafitError("give --ranks 1,2,4,... or --key section.key with --values a,b,...")
        swept, chosen = ("lora.rank", ranks) if ranks is not None else (key, values)
        settings = list(overrides or [])
        if targets:
            settings.append("lora.targets=" + json.dumps(comma_list(targets)))
        return run_sweep(recipe, swept, comma_list(chosen), overrides=settings,
                         output=output, console=stderr if as_json else Console(), train_output=2 if as_json else None)

    result = run_command(action, debug)
    if as_json:
        print_json("sweep", result)
    elif rank() == 0:
        from lorafit.sweep import sweep_table

        Console().print(sweep_table(result))

