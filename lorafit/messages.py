"""What the command line says: errors and notes as one line on stderr, a user's stop as a notice, `--json` on stdout.

Every command prints through these functions, so all of them look alike and only the main process speaks.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import typer
from rich.console import Console
from rich.markup import escape

from lorafit import __version__
from lorafit.errors import LorafitError
from lorafit.storage import json_text
from lorafit.train.launch import rank

STOPPED = 130  # the exit code of a stop the user asked for (SIGINT, SIGTERM): not a failure
stderr = Console(stderr=True)


def error(text: str) -> None:
    """`error: ...` in red, one line however narrow the terminal: bad input or a failure."""
    stderr.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


def note(text: str, console: Console = stderr) -> None:
    """`note: ...` in yellow, one line: something worth knowing that is not a failure (rows left out, a relaunch)."""
    if rank() == 0:
        console.print(f"[yellow]note:[/] {escape(text)}", highlight=False, soft_wrap=True)


def stopped(text: str) -> None:
    """A stop the user asked for (Ctrl-C, SIGTERM), in yellow without `error:`: it says what was kept and what next."""
    if rank() == 0:
        stderr.print(f"[yellow]{escape(text)}[/]", highlight=False, soft_wrap=True)


def print_json(command: str, result: dict) -> None:
    """`--json`: one strict JSON object on stdout (a NaN becomes null), from the main process only.

    Every command's object starts with `command` and `lorafit_version`; the keys that follow are the command's
    (README, "JSON output").
    """
    if rank() == 0:
        sys.stdout.write(json_text({"command": command, "lorafit_version": __version__, **result}))
        sys.stdout.flush()


def run_command(action: Callable[[], object], debug: bool) -> object:
    """Call `action` and turn what it raises into one line and an exit code (typer.Exit).

    LorafitError: its message and exit code (2 bad input, 1 failure, 130 a stop the user asked for, printed
    as a notice). Anything else is a runtime failure, exit 1. With several processes every rank meets the
    same bad input, so only the main one says so; a failure of one rank alone is printed by that rank, with
    its number.
    """
    library_logs(debug)
    try:
        return action()
    except LorafitError as problem:
        if debug and problem.exit_code != STOPPED:
            stderr.print_exception()
        if problem.exit_code == STOPPED:
            stopped(str(problem))
        elif rank() == 0:
            error(str(problem))
        raise typer.Exit(problem.exit_code) from None
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        stopped("interrupted")
        raise typer.Exit(STOPPED) from None
    except Exception as problem:  # noqa: BLE001 - the last line of defence, so users see one line
        if debug:
            stderr.print_exception()
        else:
            where = f"rank {rank()}: " if rank() else ""
            error(f"{where}{type(problem).__name__}: {problem} (run again with --debug for the traceback)")
        raise typer.Exit(1) from None


def library_logs(debug: bool) -> None:
    """Library warnings, logs and loading bars (transformers, datasets, the hub client's retries, accelerate)
    reach the screen only with --debug."""
    level = logging.WARNING if debug else logging.ERROR
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torchao (where installed, transformers imports it) warns on import about each CUDA kernel it cannot load
    logging.getLogger("torchao").setLevel(level)
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # also for processes started from this one
        import warnings

        warnings.filterwarnings("ignore")
    import datasets
    import huggingface_hub
    import torch  # noqa: F401 - torch sets its loggers' levels when imported; ours must come after
    import transformers

    logging.getLogger().setLevel(level)  # libraries that log through the root's level, accelerate among them
    logging.getLogger("torch").setLevel(level)
    for library in (transformers.logging, datasets.logging, huggingface_hub.utils.logging):
        library.set_verbosity(level)
    if debug:
        transformers.utils.logging.enable_progress_bar()
        datasets.enable_progress_bars()
        huggingface_hub.utils.enable_progress_bars()
    else:
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()
