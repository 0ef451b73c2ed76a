"""Crash-safe writes: every file and folder appears under its final name complete, or not at all."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# tempfile creates private (0600/0700) entries; give the final ones the modes a plain write would.
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
    with open(path, "a", encoding="utf-8") as file:
        file.write(line.rstrip("\n") + "\n")
        file.flush()
        os.fsync(file.fileno())


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
    temp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield temp
        os.chmod(temp, DIR_MODE)
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


def write_folder(final: Path, files: dict[str, bytes]) -> None:
    """Write `files` (relative path -> bytes) as the folder `final`, whole: old folder or new, never a mix."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        from lorafit.errors import LorafitError

        raise LorafitError(f"{final} exists and is not a folder; choose another folder")
    with staged_dir(final) as staging:
        for name, data in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
