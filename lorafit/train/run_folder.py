"""The run folder is lorafit's alone: which folders may hold a run (or a sweep), the marker that says one does,
and the lock.

A run folder is new, empty, or marked by `lorafit-run.json` (written before anything else of the run; a sweep's
folder is marked the same way, as a sweep). While a train or sweep runs, its main process holds an exclusive
`flock` on `lorafit.lock`; the OS drops the lock when the process dies, so a killed run never leaves a stale
one. The lock file stays empty: a process that is refused finds the holder's PID in /proc/locks, and nothing it
does changes the folder. A folder that a kill left with only the lock or a half-written marker is still new.
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


# What lorafit writes in a folder of each kind: (files, folders). Found as anything else, it is refused before
# any work, so that no write fails (or goes through a link) after the training.
ENTRIES = {
    "run": ({MARKER, LOCK, "recipe.toml", "metrics.jsonl", "report.json", "curves.png"},
            {"adapter", "adapter-best", "checkpoints", "logs"}),
    "sweep": ({MARKER, LOCK, "sweep.json", "sweep.png"}, set()),
}


# flock's answers on a file system that keeps no locks (NFS without lockd, some FUSE and object-store mounts)
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


def kind_of(folder: Path) -> str | None:
    """"run" or "sweep" for a folder lorafit marked (or a run or sweep from before the marker), else None."""
    folder = Path(folder)
    kind = _marked_or_old_run(folder)
    if kind is None and folder.is_dir():  # a sweep from before the marker: its table and its runs, nothing else
        entries = list(folder.iterdir())
        runs = [entry for entry in entries if entry.is_dir() and _marked_or_old_run(entry) == "run"]
        if runs and all(entry in runs or entry.name in ("sweep.json", "sweep.png") for entry in entries):
            return "sweep"
    return kind


def _marked_or_old_run(folder: Path) -> str | None:
    marker = folder / MARKER
    if marker.is_file() and not marker.is_symlink():
        try:
            kind = json.loads(marker.read_text(encoding="utf-8")).get("kind", "run")
        except (OSError, ValueError, AttributeError):
            kind = "run"  # the marker is written whole; anything else in its place marks a run
        return kind if kind in ENTRIES else "run"
    if (folder / "recipe.toml").is_file() and ((folder / "checkpoints").is_dir() or (folder / "adapter").is_dir()):
        return "run"
    return None


def _own_leftover(name: str) -> bool:
    """The lock, or a marker's temporary file that a kill left behind (storage.write_atomic's name for it)."""
    return name == LOCK or (name.startswith(f".{MARKER}.") and name.endswith(".tmp"))


def check_output(run_dir: str, model_name: str, kind: str = "run") -> Path:
    """The run (or sweep) folder, refused before any work when lorafit must not write there; nothing is created."""
    key = "[output] dir" if kind == "run" else "the sweep folder"
    if not str(run_dir).strip():
        raise LorafitError(f"{key} is empty; give the {kind} its own folder, e.g. --output runs/my-{kind}")
    path = Path(run_dir).expanduser().resolve()
    for special, what in ((Path(path.anchor), "the file system's root"), (Path.home().resolve(), "your home folder")):
        if path == special:
            raise LorafitError(f"{key} {path} is {what}; give the {kind} its own folder, e.g. {path / 'runs' / 'my-run'}")
    model = Path(model_name).expanduser()
    if model.is_dir() and (path == model.resolve() or model.resolve() in path.parents):
        raise LorafitError(f"{key} {path} is inside the model folder {model}; write the {kind} to another folder")
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))  # exists() raises on long names
    _check_names(path, existing, key)
    if existing != path and not existing.is_dir():
        raise LorafitError(f"{key} {path} lies under {existing}, which is a file; choose a folder for the {kind}")
    if path.exists() and not path.is_dir():
        raise LorafitError(f"{key} {path} is a file, not a folder; choose a folder for the {kind}")
    if path.is_dir():
        _check_entries(path, kind, key)
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise LorafitError(f"{key} {path} is on a read-only file system; choose a writable place")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LorafitError(f"cannot write to {existing} (permission denied); choose a place you can write to")
    return path


def _check_names(path: Path, existing: Path, key: str) -> None:
    """Every name lorafit would create fits the file system (255 bytes on most)."""
    try:
        limit = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for name in path.parts:
        if len(os.fsencode(name)) > limit:
            raise LorafitError(f"{key} has a name of {len(os.fsencode(name))} bytes ({name[:24]}...), over the "
                               f"file system's limit of {limit}; choose a shorter name")


def _check_entries(path: Path, kind: str, key: str) -> None:
    """A folder of another kind, files that are not lorafit's, or lorafit's own names as the wrong thing."""
    entries = list(path.iterdir())
    _check_own([entry for entry in entries if entry.name in (MARKER, LOCK)])
    found = kind_of(path)
    if found is not None and found != kind:
        raise LorafitError(f"{key} {path} holds a lorafit {found}, not a {kind}; choose a new or empty folder")
    if found is None:
        foreign = sorted(entry.name for entry in entries if not _own_leftover(entry.name))
        if foreign:
            raise LorafitError(
                f"{key} {path} holds files that are not a lorafit {kind} ({foreign[0]}"
                f"{', ...' if len(foreign) > 1 else ''}); choose a new or empty folder"
            )
    _check_own(entries, *ENTRIES[kind])


def _check_own(entries: list[Path], files: set[str] = frozenset({MARKER, LOCK}), folders: set[str] = frozenset()):
    """lorafit's own names must be what lorafit writes there: a plain file or a plain folder, never a link."""
    for entry in entries:
        expected = "file" if entry.name in files else "folder" if entry.name in folders else None
        if expected and (entry.is_symlink() or not (entry.is_dir() if expected == "folder" else entry.is_file())):
            what = "a link" if entry.is_symlink() else "a folder" if entry.is_dir() else f"not a {expected}"
            raise LorafitError(f"{entry} is {what}, where lorafit keeps its own {expected}; remove it, or choose "
                               "another folder")


def mark(run_dir: Path, kind: str = "run") -> None:
    """Write the marker, first of all the run's files, so the folder is known as a run (or sweep) from then on."""
    for leftover in Path(run_dir).glob(f".{MARKER}.*.tmp"):  # of a process killed while writing it
        leftover.unlink(missing_ok=True)
    if not (run_dir / MARKER).is_file():
        write_atomic(run_dir / MARKER, json.dumps({"lorafit_version": __version__, "kind": kind}) + "\n")


class RunLock:
    """An exclusive `flock` on <folder>/lorafit.lock; `release` removes what the holder made if the run never began
    (the lock file, and every folder it created on the way)."""

    def __init__(self, run_dir: Path, kind: str = "run"):
        self.run_dir = Path(run_dir)
        self.created = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
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
                        f"({errno.errorcode.get(error.errno, error.errno)}); move the folder to a local disk, or to "
                        "a network file system mounted with locking (NFS with lockd, not -o nolock)"
                    ) from None
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise LorafitError(
                    f"{self.run_dir} is in use by another lorafit {'train' if kind == 'run' else kind} ({holder}); "
                    "wait for it to end, or give this run another --output"
                ) from None
            if path.exists() and os.stat(path).st_ino == os.fstat(self.fd).st_ino:
                return
            os.close(self.fd)

    def release(self) -> None:
        """Unlock; a folder in which no run began (no marker) loses the lock file, and the folders we made."""
        self._forget()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)

    def _forget(self) -> None:
        if not (self.run_dir / MARKER).exists():
            (self.run_dir / LOCK).unlink(missing_ok=True)
            for folder in self.created:  # deepest first
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()


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
