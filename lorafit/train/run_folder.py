"""The run folder is lorafit's alone: which folders may hold a run, the marker that says one does, and the lock.

A run folder is new, empty, or marked by `lorafit-run.json` (written before anything else of the run).
While a train runs, its main process holds an exclusive `flock` on `lorafit.lock`; the OS drops the lock
when the process dies, so a killed run never leaves a stale one. The lock file stays empty: a process
that is refused finds the holder's PID in /proc/locks, and nothing it does changes the folder.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

from lorafit import __version__
from lorafit.errors import LorafitError
from lorafit.storage import FILE_MODE, write_atomic

MARKER = "lorafit-run.json"


LOCK = "lorafit.lock"


OWN = (MARKER, LOCK)


# flock's answers on a file system that keeps no locks (NFS without lockd, some FUSE and object-store mounts)
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


def is_run(folder: Path) -> bool:
    """Marked as a run, or a run written before the marker existed (its recipe beside checkpoints or an adapter)."""
    folder = Path(folder)
    if (folder / MARKER).is_file():
        return True
    return (folder / "recipe.toml").is_file() and ((folder / "checkpoints").is_dir() or (folder / "adapter").is_dir())


def check_output(run_dir: str, model_name: str) -> Path:
    """The run folder, refused before any work when lorafit must not write there; nothing is created."""
    if not str(run_dir).strip():
        raise LorafitError("[output] dir is empty; give the run its own folder, e.g. --output runs/my-run")
    path = Path(run_dir).expanduser().resolve()
    for special, what in ((Path(path.anchor), "the file system's root"), (Path.home().resolve(), "your home folder")):
        if path == special:
            raise LorafitError(f"[output] dir {path} is {what}; give the run its own folder, e.g. {path / 'runs' / 'my-run'}")
    model = Path(model_name).expanduser()
    if model.is_dir() and (path == model.resolve() or model.resolve() in path.parents):
        raise LorafitError(f"[output] dir {path} is inside the model folder {model}; write the run to another folder")
    if path.exists() and not path.is_dir():
        raise LorafitError(f"[output] dir {path} is a file, not a folder; choose a folder for the run")
    if path.is_dir() and not is_run(path):
        foreign = sorted(entry.name for entry in path.iterdir() if entry.name not in OWN)
        if foreign:
            raise LorafitError(
                f"[output] dir {path} holds files that are not a lorafit run ({foreign[0]}"
                f"{', ...' if len(foreign) > 1 else ''}); choose a new or empty folder"
            )
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LorafitError(f"cannot write to {existing} (permission denied); choose an [output] dir you can write to")
    return path


def mark(run_dir: Path) -> None:
    """Write the marker, first of all the run's files, so the folder is known as a run from then on."""
    if not (run_dir / MARKER).is_file():
        write_atomic(run_dir / MARKER, json.dumps({"lorafit_version": __version__}) + "\n")


class RunLock:
    """An exclusive `flock` on <run>/lorafit.lock; `release` removes what the holder made if the run never began."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK
        while True:  # a lock file unlinked by its last holder between our open and our flock is not the lock
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = _holder(self.fd)
                os.close(self.fd)
                if error.errno in NO_LOCKS:
                    self._forget()
                    raise LorafitError(
                        f"cannot lock {path}: its file system does not support file locks "
                        f"({errno.errorcode.get(error.errno, error.errno)}); put [output] dir on a local disk, or on "
                        "a network file system mounted with locking (NFS with lockd, not -o nolock)"
                    ) from None
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise LorafitError(
                    f"{self.run_dir} is in use by another lorafit train ({holder}); wait for it to end, "
                    "or give this run another --output"
                ) from None
            if path.exists() and os.stat(path).st_ino == os.fstat(self.fd).st_ino:
                return
            os.close(self.fd)

    def release(self) -> None:
        """Unlock; a folder in which no run began (no marker) loses the lock file, and the folder if we made it."""
        self._forget()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)

    def _forget(self) -> None:
        if not (self.run_dir / MARKER).exists():
            (self.run_dir / LOCK).unlink(missing_ok=True)
            if self.created and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()


def _holder(fd: int) -> str:
    """'pid N' of the process holding the flock on `fd`'s file, from /proc/locks (Linux); else a vaguer phrase."""
    inode = os.fstat(fd).st_ino
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "another process"
    for line in lines:
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].endswith(f":{inode}"):
            return f"pid {fields[4]}"
    return "another process"
