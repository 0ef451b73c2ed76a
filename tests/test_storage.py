"""Crash-safe writes: a file or folder is the old one or the complete new one, never a mix, and no temp is left."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from lorafit import storage
from lorafit.errors import LorafitError
from lorafit.storage import input_file, staged_dir, write_atomic, write_folder, write_json


class ExplodingText(str):
    """A str whose encoding fails, as a write that dies after the temporary file was opened."""

    def encode(self, *args, **kwargs):
        raise RuntimeError("disk on fire")


def entries(folder: Path) -> list[str]:
    """Every file and folder under `folder`, hidden ones included, relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def tree(folder: Path) -> dict[str, bytes | None]:
    """Relative path -> content (None for folders): what a reader would find."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))
    }


def fail_on_call(monkeypatch, number: int) -> list:
    """Make the `number`-th call to os.replace (1-based) raise, as a crash at that moment would."""
    real = os.replace
    calls: list = []

    def replace(source, target):
        calls.append((source, target))
        if len(calls) == number:
            raise OSError("simulated failure of rename")
        return real(source, target)

    monkeypatch.setattr(storage.os, "replace", replace)
    return calls


# ---------------------------------------------------------------- write_atomic


def test_write_atomic_writes_text_and_bytes_and_leaves_no_temp_files(tmp_path):
    write_atomic(tmp_path / "a.txt", "héllo\n")
    write_atomic(tmp_path / "deeper" / "b.bin", b"\x00\x01")
    write_json(tmp_path / "c.json", {"step": 3})

    assert (tmp_path / "a.txt").read_bytes() == "héllo\n".encode()
    assert (tmp_path / "deeper" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.json").read_text() == '{\n  "step": 3\n}\n'
    assert entries(tmp_path) == ["a.txt", "c.json", "deeper", "deeper/b.bin"]


def test_write_atomic_replaces_existing_content_whole(tmp_path):
    target = tmp_path / "metrics.jsonl"
    target.write_text("old line that is much longer than the new one\n")
    write_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert entries(tmp_path) == ["metrics.jsonl"]


def test_write_atomic_failure_while_writing_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_atomic(target, ExplodingText("new"))
    assert target.read_text() == "old"
    assert entries(tmp_path) == ["report.json"]


def test_write_atomic_failed_rename_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old")
    fail_on_call(monkeypatch, 1)
    with pytest.raises(OSError, match="simulated"):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert entries(tmp_path) == ["report.json"]


def test_write_atomic_interrupted_by_ctrl_c_leaves_no_temp(tmp_path, monkeypatch):
    def interrupted(source, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "a.txt", "x")
    assert entries(tmp_path) == []


def test_write_atomic_file_mode_matches_a_plain_write(tmp_path):
    """tempfile makes 0600 files; the final file must get the mode open() would give under the umask."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_atomic(tmp_path / "atomic.txt", "x")
    mode = stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode)
    assert mode == stat.S_IMODE(plain.stat().st_mode)
    assert mode != 0o600


# ---------------------------------------------------------------- staged_dir


def make_folder(path: Path, files: dict[str, str]) -> None:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)


def test_staged_dir_creates_the_folder_only_when_the_body_succeeds(tmp_path):
    final = tmp_path / "adapter"
    with staged_dir(final) as staging:
        (staging / "weights").write_text("new")
        assert not final.exists()  # nothing appears under the final name while it is being built
    assert tree(tmp_path) == {"adapter": None, "adapter/weights": b"new"}


def test_staged_dir_replaces_an_existing_folder_whole(tmp_path):
    final = tmp_path / "adapter"
    make_folder(final, {"weights": "old", "stale-only-in-old": "old"})
    with staged_dir(final) as staging:
        (staging / "weights").write_text("new")
        assert (final / "weights").read_text() == "old"  # readers still see the old folder meanwhile
    assert tree(tmp_path) == {"adapter": None, "adapter/weights": b"new"}


def test_staged_dir_keeps_the_old_folder_when_the_body_raises(tmp_path):
    final = tmp_path / "adapter"
    make_folder(final, {"weights": "old"})
    with pytest.raises(ValueError), staged_dir(final) as staging:
        (staging / "weights").write_text("half")
        raise ValueError("serialising failed")
    assert tree(tmp_path) == {"adapter": None, "adapter/weights": b"old"}


def test_staged_dir_leaves_nothing_when_a_new_folder_fails(tmp_path):
    with pytest.raises(ValueError), staged_dir(tmp_path / "checkpoints" / "step-000003") as staging:
        (staging / "state").write_text("half")
        raise ValueError
    assert entries(tmp_path / "checkpoints") == []


def test_staged_dir_restores_the_old_folder_when_the_swap_fails(tmp_path, monkeypatch):
    final = tmp_path / "adapter"
    make_folder(final, {"weights": "old"})
    calls = fail_on_call(monkeypatch, 2)  # 1: old folder aside, 2: new folder into place
    with pytest.raises(OSError, match="simulated"), staged_dir(final) as staging:
        (staging / "weights").write_text("new")
    assert len(calls) == 3  # the third call put the old folder back
    assert tree(tmp_path) == {"adapter": None, "adapter/weights": b"old"}


def test_staged_dir_folder_mode_matches_a_plain_mkdir(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with staged_dir(tmp_path / "staged"):
        pass
    mode = stat.S_IMODE((tmp_path / "staged").stat().st_mode)
    assert mode == stat.S_IMODE(plain.stat().st_mode)
    assert mode != 0o700


# ---------------------------------------------------------------- OS errors name the path the user knows


def test_a_failed_write_names_the_final_file_not_the_temporary_one(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write past a full disk: no file named

    monkeypatch.setattr(storage.os, "fsync", full)
    with pytest.raises(OSError) as raised:
        write_atomic(tmp_path / "report.json", "{}")
    assert raised.value.filename == str(tmp_path / "report.json")
    monkeypatch.setattr(Path, "write_bytes", lambda path, data: full(None))
    with pytest.raises(OSError) as raised:
        write_folder(tmp_path / "adapter", {"weights.bin": b"x"})
    assert raised.value.filename == str(tmp_path / "adapter" / "weights.bin")
    assert entries(tmp_path) == []


def test_a_failed_write_in_a_staged_folder_names_the_file_under_its_final_folder(tmp_path):
    with pytest.raises(OSError) as raised, staged_dir(tmp_path / "merged") as staging:
        (staging / "model.safetensors").mkdir()
        (staging / "model.safetensors").write_bytes(b"x")  # EISDIR, naming the staging path
    assert raised.value.errno == errno.EISDIR
    assert raised.value.filename == str(tmp_path / "merged" / "model.safetensors")


def test_files_a_writer_made_private_in_a_staged_folder_get_the_umask_mode(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with staged_dir(tmp_path / "merged") as staging:
        (staging / "model.safetensors").write_bytes(b"x")
        os.chmod(staging / "model.safetensors", 0o600)  # what safetensors' save_file does
    assert stat.S_IMODE((tmp_path / "merged" / "model.safetensors").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


@pytest.mark.parametrize(("make", "said"), [
    (lambda path: None, "does not exist"),
    (lambda path: path.mkdir(), "is a folder, not a file"),
    (lambda path: os.mkfifo(path), r"is not a regular file \(a pipe or a device\)"),
])
def test_an_input_file_that_is_not_a_file_is_named_for_what_it_is(tmp_path, make, said):
    make(tmp_path / "rows.jsonl")
    with pytest.raises(LorafitError, match=f"data file {tmp_path / 'rows.jsonl'} {said}; fix it"):
        input_file(tmp_path / "rows.jsonl", "data file", "fix it")
