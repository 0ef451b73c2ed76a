"""`make gpu-check`'s own logic, which runs on CPUs too: phase limits that fire, and which carried wheels it installs."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

HANGS = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a grandchild holding the output open
print("started", flush=True)
time.sleep(600)
"""


def test_a_phase_past_its_limit_is_stopped_there_with_its_children():
    start = time.monotonic()
    code, output, seconds = gpu_check.run("demo", [sys.executable, "-c", HANGS], dict(os.environ), limit=3)
    assert code == gpu_check.TIMED_OUT
    assert time.monotonic() - start < 120  # far below the child's 600 s, however loaded the machine
    assert "started" in output and "stopped at its limit of 3 s" in output


def test_a_phase_within_its_limit_returns_its_exit_code_and_output():
    code, output, _ = gpu_check.run("demo", [sys.executable, "-c", "print('done'); raise SystemExit(3)"],
                                    dict(os.environ), limit=120)
    assert (code, output) == (3, "done\n")


def test_the_phase_limits_add_up_to_under_eight_minutes():
    assert gpu_check.TOTAL < 8 * 60  # and so under the device's 600 s per command
    assert all(limit <= gpu_check.TOTAL for limit in gpu_check.LIMITS.values())


@pytest.mark.parametrize(("wheel", "needed"), [
    ("pytest-1.0-py3-none-any.whl", False),  # importable, and newer than the wheel
    ("pytest-9999.0-py3-none-any.whl", True),  # importable but older than the wheel: upgraded
    ("lorafit_no_such_module-1.0-py3-none-any.whl", True),  # missing
])
def test_a_carried_wheel_is_installed_when_missing_or_newer_than_what_is_there(wheel, needed):
    assert gpu_check.wheel_needed(Path(wheel)) is needed
