"""Crash-safe writes: every file and folder appears under its final name complete, or not at all.

An OS error raised while writing names the path the user knows (not a temporary name, and a failed write to an
open file names its file), so that lorafit.errors.os_failure can say what failed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lorafit.errors import LorafitError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# tempfile creates private (0600/0700) entries; give the final ones the modes a plain write would.
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


@contextlib.contextmanager
def named(path: Path, temp: Path | None = None) -> Iterator[None]:
    """OS errors raised inside name `path`: when they name nothing (a failed write) or the temporary `temp`
    (a file in it becomes the same file under `path`)."""
    try:
        yield
    except OSError as error:
        if error.errno is None:  # not the OS's (OSError("text")): its text says what it means
            raise
        if error.filename is None:
            error.filename = str(path)
        elif temp is not None and Path(error.filename).is_relative_to(temp):
            error.filename = str(path / Path(error.filename).relative_to(temp))
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with named(path):
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with named(path, Path(temp)):
            with os.fdopen(handle, "wb") as file:
                file.write(data.encode("utf-8") if isinstance(data, str) else data)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temp, FILE_MODE)
            os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync it: a crash loses at most the line being written, never the lines before."""
    with named(path), open(path, "a", encoding="utf-8") as file:
        file.write(line.rstrip("\n") + "\n")
        file.flush()
        os.fsync(file.fileno())


def input_file(path: Path, what: str, fix: str) -> Path:
    """`path` when it is a regular file to read; else one line naming what it is (missing, a folder, a pipe)."""
    path = Path(path)
    if not path.exists():
        raise LorafitError(f"{what} {path} does not exist; {fix}")
    if path.is_dir():
        raise LorafitError(f"{what} {path} is a folder, not a file; {fix}")
    if not path.is_file():
        raise LorafitError(f"{what} {path} is not a regular file (a pipe or a device); {fix}")
    return path


def json_text(data: object) -> str:
    """Strict JSON (RFC 8259) for files and `--json`: a NaN or infinite number is written as null, never as NaN."""
    return json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n"


def _finite(data: object) -> object:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(value) for value in data]
    return data


def write_json(path: Path, data: object) -> None:
    write_atomic(path, json_text(data))


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it replaces `final` whole.

    An existing `final` is renamed aside first and put back if the swap fails, so at every moment
    the old folder or the new one is in place, never a mix.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with named(final):
        temp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        with named(final, temp):
            yield temp
        _plain_modes(temp)
        if not (final.exists() or final.is_symlink()):
            os.replace(temp, final)
            return
        aside = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".old")) / final.name
        os.replace(final, aside)
        try:
            os.replace(temp, final)
        except BaseException:
            os.replace(aside, final)
            aside.parent.rmdir()
            raise
        shutil.rmtree(aside.parent, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _plain_modes(folder: Path) -> None:
    """The modes a plain write gives, on `folder` and all in it: tempfile's folder is private, and so are the
    files some writers make (safetensors' save_file)."""
    os.chmod(folder, DIR_MODE)
    for parent, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(parent, name), DIR_MODE)
        for name in files:
            os.chmod(os.path.join(parent, name), FILE_MODE)


def write_folder(final: Path, files: dict[str, bytes]) -> None:
    """Write `files` (relative path -> bytes) as the folder `final`, whole: old folder or new, never a mix."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise LorafitError(f"{final} exists and is not a folder; choose another folder")
    with staged_dir(final) as staging:
        for name, data in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with named(final / name):
                path.write_bytes(data)
