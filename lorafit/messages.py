"""What the command line says: errors and notes as one line on stderr, a user's stop as a notice, `--json` on stdout.

Every command prints through these functions, so all of them look alike and only the main process speaks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import typer
from rich.console import Console
from rich.markup import escape

from lorafit import __version__
from lorafit.errors import LorafitError, os_failure
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
    as a notice). An OSError: lorafit.errors.os_failure's line (the path, the cause, what to do). Anything else
    is a runtime failure, exit 1. SIGTERM stops every command as Ctrl-C does, from before the libraries are
    imported. With several processes every rank meets the same bad input, so only the main one says so; a
    failure of one rank alone is printed by that rank, with its number.
    """
    try:
        with sigterm_as_interrupt():
            library_logs(debug)
            return action()
    except LorafitError as problem:
        if debug and problem.exit_code != STOPPED:
            stderr.print_exception()
        fail(str(problem), problem.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C, or a signal outside train's steps: stop at once
        fail("stopped by a signal; nothing more was written", STOPPED)
    except OSError as problem:
        if debug:
            stderr.print_exception()
        failure = os_failure(problem)
        fail(f"rank {rank()}: {failure}" if rank() else str(failure), failure.exit_code, everywhere=True)
    except Exception as problem:  # noqa: BLE001 - the last line of defence, so users see one line
        if debug:
            stderr.print_exception()
        where = f"rank {rank()}: " if rank() else ""
        fail(f"{where}{type(problem).__name__}: {problem} (run again with --debug for the traceback)", 1,
             everywhere=True)


def fail(text: str, code: int, *, everywhere: bool = False) -> None:
    """Print the line that ends a command and exit with `code`: a stop as a notice, anything else as an error
    (from the main process, or from every one when only this rank may have failed).

    Under torchrun the line also goes to the file torchrun reads a worker's failure from, so that its summary,
    printed after every worker has ended, repeats it; torchrun itself exits 1 whatever the workers' codes.
    """
    if code == STOPPED:
        stopped(text)
    elif everywhere or rank() == 0:
        error(text)
    launcher_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if launcher_file:
        with contextlib.suppress(OSError), open(launcher_file, "w", encoding="utf-8") as file:
            json.dump({"message": f"lorafit exit {code}: {text}", "timestamp": int(time.time())}, file)
    raise typer.Exit(code) from None


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so that a command stopped by it says so and exits 130
    (train's steps put their own handler on top, which saves a checkpoint first). Where SIGTERM already has a
    handler (`python -m lorafit` installs this one before any import), it is kept."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
