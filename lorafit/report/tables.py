"""What the terminal shows: parameter and memory tables, evaluation, the end-of-run box, the progress bar."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lorafit.recipe import GENERATION_METRICS

SCORES = ("loss", "perplexity", "accuracy", *GENERATION_METRICS)  # the evaluation's numbers, as tables show them


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def info_tables(report: dict) -> list:
    """Rich renderables for `lorafit info` and the end-of-training summary."""
    from rich.table import Table

    from lorafit.lora.variants import VARIANTS

    lora = report["lora"]
    exports = lora.get("exports")
    modules = Table(title=f"{VARIANTS[lora['variant']].title} targets (rank {lora['rank']}, alpha {lora['alpha']:g})",
                    caption=escape(exports) if exports else None)
    for column in ("module", "shape (d_out x d_in)", "LoRA params"):
        modules.add_column(column, justify="right" if column != "module" else "left")
    rows = report["modules"]
    shown = rows if len(rows) <= 12 else rows[:6] + [None] + rows[-3:]
    for row in shown:
        if row is None:
            modules.add_row(f"... {len(rows) - 9} more", "", "")
        else:
            experts = f" ({row['experts']} experts)" if "experts" in row else ""
            modules.add_row(escape(row["name"]), " x ".join(map(str, row["shape"])) + experts, f"{row['lora_params']:,}")
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
    activations = memory.get("activations")
    if activations:
        totals.add_row(f"activations (est., {activations['rows']} rows × {activations['length']} tokens)",
                       f"{human_bytes(activations['total'])}  [dim](gradient checkpointing: "
                       f"{human_bytes(activations['checkpointed'])})")
    totals.caption = f"Estimates count {memory['counted']}" + ("; activations, what autograd keeps for backward"
                                                               if activations else "") + "."
    return [modules, totals]


def eval_table(result: dict, title: str = "Evaluation"):
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    for key in SCORES:
        if key in result:
            table.add_row(key, f"{result[key]:.4f}")
    table.add_row("examples", f"{result['examples']:,}")
    if "prompts" in result:
        table.add_row("prompts generated for", f"{result['prompts']:,}")
    return table


def summary_tables(report: dict, run_dir, loss_curve: str = "") -> list:
    """The end-of-run box: what was trained, how fast, how much memory, and how it scores (and the loss's shape).
    Text that comes from the recipe, the data or the machine is escaped: "[data] eval_split" is not markup."""
    from rich.table import Table

    table = Table(title=f"lorafit run: {escape(str(run_dir))}", show_header=False)
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
    other_rows = " (on other rows)" if before.get("rows_changed") else ""  # the eval data changed on a resume
    for key in SCORES:
        if key in evaluation:
            was = f"{before[key]:.4f}{other_rows} -> " if key in before else ""
            table.add_row(f"eval {key}", f"{was}{evaluation[key]:.4f}")
    if before.get("examples", evaluation.get("examples")) != evaluation.get("examples"):  # max_eval_examples changed
        table.add_row("eval examples", f"{before['examples']:,} -> {evaluation['examples']:,}")
    if "skipped" in evaluation:
        table.add_row("eval", f"none: {escape(evaluation['skipped'])}")
    if loss_curve:
        table.add_row("training loss", loss_curve)
    table.add_row("device", escape(report["device"]))
    return [table]


def print_fitting(console: Console, split) -> None:
    """A split's rows shortened, cut, split into windows or left out, when there are any."""
    from lorafit.messages import note

    text = split.note()
    if text:
        note(text, console)


def draws_bars(console: Console) -> bool:
    """Whether a library's own progress bar (tokenizing) may be drawn for this console: on a terminal, not for
    the quiet consoles of other processes, not under --json (whose commands print to stderr, stdout being the JSON's)."""
    return console.is_terminal and not console.quiet and not console.stderr


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
    generated = "".join(f"  {key} {result[key]:.2f}" for key in GENERATION_METRICS if key in result)
    prompts = f", {result['prompts']} prompts" if "prompts" in result else ""
    console.print(
        f"eval {when}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}{accuracy}{generated}  "
        f"({result['examples']} examples{prompts})"
    )
