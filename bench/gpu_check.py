"""`make gpu-check`: everything that needs a CUDA GPU, in one go (under 8 minutes on one H100/H200).

1. the tests marked `gpu`; 2. the shipped demo (recipes/tiny-sst2.toml) in lorafit's GPU default, bf16;
3. bench/run.py's GPU-sized jobs l (1B-class Llama at 2,048 tokens) and m (GPT-2-medium, SST-2-style),
lorafit against peft; 4. where vllm is importable, bench/vllm_parity.py (vLLM serving the adapter `lorafit
export --for vllm` wrote, against peft). It ends with one JSON line holding the figures of all of them.

It runs on the machine's own python3 and CUDA torch, which it never replaces: a GPU image often lacks
datasets, pydantic and tomli-w and reaches no registry, so what is missing is installed into a scratch
folder from the wheels in .whl/ (`make gpu-wheels` fetches them on a machine that reaches one).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
LIMITS = {"tests": 180, "demo": 120, "bench": 300, "vllm": 240}  # seconds per phase; under 8 minutes without vLLM


def install_missing(site: Path) -> list[str]:
    """Install each carried wheel whose module this python cannot import (never one it already has)."""
    wheels = [w for w in sorted(WHEELS.glob("*.whl")) if importlib.util.find_spec(w.name.split("-")[0]) is None]
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *map(str, wheels)], check=True)
    return [w.name.split("-")[0] for w in wheels]


def run(phase: str, command: list[str], env: dict) -> tuple[int, str, float]:
    """(exit code, output, seconds) of one phase; its output is shown as it comes."""
    print(f"\n== {phase}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    lines = []
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        code = process.wait(timeout=LIMITS[phase])
    except subprocess.TimeoutExpired:
        process.kill()
        code = 124
    return code, "".join(lines), time.perf_counter() - start


def demo_figures(run_dir: Path) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    throughput, memory = report["throughput"], report["memory"]
    return {"dtype": report["dtype"], "mixed_precision": report["mixed_precision"],
            "accuracy_before": report["eval"]["before"]["accuracy"], "accuracy": report["eval"]["accuracy"],
            "tokens_per_s": round(throughput["tokens_per_s"]), "mfu": throughput["mfu"],
            "peak_allocated_mib": round(memory["peak_bytes"] / 2**20),
            "peak_reserved_mib": round(memory.get("peak_reserved_bytes", 0) / 2**20)}


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: this python's torch sees no CUDA GPU; run it on a GPU machine", file=sys.stderr)
        return 2
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="lorafit-gpu-check-"))
    installed = install_missing(scratch / "site")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(scratch / "site"), os.environ.get("PYTHONPATH", "")])}
    summary = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "installed_from_wheels": installed}

    code, output, seconds = run("tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "tests"], env)
    summary["tests"] = {"exit": code, "result": output.strip().splitlines()[-1] if output.strip() else "",
                        "seconds": round(seconds)}

    run_dir = scratch / "demo"
    code, _, seconds = run("demo", [sys.executable, "-m", "lorafit", "train", "--recipe", "recipes/tiny-sst2.toml",
                                    "-o", str(run_dir)], env)
    summary["demo"] = {"exit": code, "seconds": round(seconds),
                       **(demo_figures(run_dir) if code == 0 else {})}

    code, output, seconds = run("bench", [sys.executable, "bench/run.py", "--jobs", "l,m", "--steps", "8",
                                          "--warmup", "2", "--json"], env)
    last = output.strip().splitlines()[-1] if output.strip() else ""
    summary["bench"] = {"exit": code, "seconds": round(seconds),
                        **(json.loads(last)["jobs"] if code == 0 and last.startswith("{") else {})}
    phases = ["tests", "demo", "bench"]
    if importlib.util.find_spec("vllm") is None:  # vLLM is never installed for this check: it runs where it is
        summary["vllm"] = {"skipped": "vllm is not installed"}
    else:
        code, output, seconds = run("vllm", [sys.executable, "bench/vllm_parity.py"], env)
        last = output.strip().splitlines()[-1] if output.strip() else ""
        summary["vllm"] = {"exit": code, "seconds": round(seconds), **(json.loads(last) if last.startswith("{") else {})}
        phases.append("vllm")
    summary["seconds"] = round(time.perf_counter() - started)
    print(json.dumps(summary), flush=True)
    return 0 if all(summary[phase]["exit"] == 0 for phase in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
