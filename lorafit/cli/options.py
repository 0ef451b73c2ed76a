"""What the commands share: the group that turns usage errors into one line, the common options, and the
relaunch that `accelerate launch` without GPUs needs."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from lorafit import __version__
from lorafit.errors import LorafitError
from lorafit.messages import error, note, run_command

# A usage error of the click that typer runs on (recent typers carry their own copy of click).
UsageError = typer.BadParameter.__base__


class Commands(TyperGroup):
    """lorafit's commands, whose usage errors (a missing or malformed option) read like any other bad input:
    one `error:` line and exit 2, instead of click's boxed usage text."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        with _usage_errors_in_one_line():
            return super().parse_args(ctx, args)

    def invoke(self, ctx):
        with _usage_errors_in_one_line():  # a command's own options are parsed inside the group's invoke
            return super().invoke(ctx)

    def format_commands(self, ctx, formatter) -> None:
        """Each command's first sentence whole (click would cut it at the terminal's width)."""
        rows = [(name, self.get_command(ctx, name).get_short_help_str(limit=1000)) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@contextlib.contextmanager
def _usage_errors_in_one_line():
    try:
        yield
    except UsageError as problem:
        if type(problem).__name__ == "NoArgsIsHelpError":
            raise  # `lorafit` alone prints its help
        where = problem.ctx.command_path if problem.ctx is not None else "lorafit"
        error(f"{problem.format_message().rstrip('.')}; see {where} --help")
        raise typer.Exit(problem.exit_code) from None


def _print_version(show: bool) -> None:
    if show:
        print(f"lorafit {__version__}")
        raise typer.Exit()


def global_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Options of `lorafit` itself, before the command."""


Debug = Annotated[bool, typer.Option("--debug", help="Show library logs and full tracebacks.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else there.")]
RecipePath = Annotated[Path, typer.Option("--recipe", "-r", help="Recipe TOML file.")]
RunRecipePath = Annotated[Optional[Path], typer.Option(
    "--recipe", "-r", help="Recipe TOML file (with --resume: the run's own, if not given).")]
DryRun = Annotated[bool, typer.Option(
    "--dry-run", help="Show the resolved recipe, model, data, first tokenized rows and plan, then stop; writes nothing."
)]
Overrides = Annotated[
    Optional[list[str]], typer.Option("--set", metavar="SECTION.KEY=VALUE", help="Override a recipe key (repeatable).")
]
AdapterDir = Annotated[Optional[Path], typer.Option("--adapter", help="Adapter folder to apply to the base.")]
ModelDir = Annotated[Optional[Path], typer.Option("--model", help="A full (e.g. merged) model folder instead.")]


def one_model(adapter: Path | None, model: Path | None) -> None:
    """--adapter and --model name two different things to run; refuse both at once."""
    if adapter is not None and model is not None:
        raise LorafitError("give --adapter or --model, not both")


def comma_list(text: str) -> list[str]:
    """"q, v," -> ["q", "v"]: an option's comma-separated values."""
    return [item.strip() for item in text.split(",") if item.strip()]


def start_missing_processes() -> None:
    """Under `accelerate launch --num_processes N` without GPUs, become the N processes it meant to start."""
    from lorafit.train.launch import relaunch_command

    command = run_command(lambda: relaunch_command(sys.argv[1:]), debug=False)
    if command:
        note(f"accelerate started one process without GPUs; starting {command[3].split('=')[1]} processes "
             "through torch.distributed.run")
        os.execv(command[0], command)
