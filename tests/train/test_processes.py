"""Several processes give the result of one: 2 gloo processes on CPU, started the way users start them.

One uninterrupted 2-process DDP run (torchrun), one FSDP2 run (accelerate launch, no --multi_gpu) and one
2-process run stopped by SIGTERM to one rank are compared with in-process 1-process runs of the same
global batch: 1 × batch 8 and 1 × batch 4 × grad_accum 2, all with LoRA dropout on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_MODEL, write_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.recipe_file import load_recipe
from lorafit.train.loop import train

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("processes")]

TRAIN = {"max_steps": 6, "log_every": 2, "save_every": 3, "lr": 1e-3, "eval_batch_size": 4, "seed": 11}
LORA = {"dropout": 0.1}
DATA = {"max_eval_examples": 10}
STOP_AT = 5
WAIT_S = 300
ADAPTER = "adapter/adapter_model.safetensors"

PAUSING_RANK = r"""
import os, sys, time
from pathlib import Path

marker, step = Path(os.environ["TEST_MARKER"]), int(os.environ["TEST_STEP"])
if os.environ["RANK"] == "1":  # rank 1 blocks inside step `step` until the test has signalled it
    import lorafit.model.loss
    real, calls = lorafit.model.loss.loss_sum, []

    def loss_sum(model, batch, *options):
        calls.append(1)
        if len(calls) == step:
            (marker / "paused").write_text(str(os.getpid()))
            while not (marker / "go").exists():
                time.sleep(0.01)
        return real(model, batch, *options)

    lorafit.model.loss.loss_sum = loss_sum
from lorafit.cli import app
app(sys.argv[1:], prog_name="lorafit")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "RANK", "WORLD_SIZE", "MASTER_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            *args]


def launch(command: list[str], log: Path, **env: str) -> subprocess.CompletedProcess:
    with open(log, "w") as output:
        return subprocess.run(command, cwd=REPO, env=environment(**env), stdout=output, stderr=subprocess.STDOUT,
                              timeout=WAIT_S, check=False)


def recipe(folder: Path, **train_keys) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_recipe(folder, train={**TRAIN, **train_keys}, lora=LORA, data=DATA)


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / ADAPTER))


def max_difference(left: dict, right: dict) -> float:
    assert left.keys() == right.keys()
    return max((left[k] - right[k]).abs().max().item() for k in left)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The 2-process runs (DDP by torchrun, FSDP2 by accelerate launch) and the 1-process runs they must equal."""
    root = tmp_path_factory.mktemp("parallel")
    found = {}
    for name, keys in (("one", {"batch_size": 8}), ("accumulated", {"batch_size": 4, "grad_accum": 2})):
        found[name] = {"report": train(load_recipe(recipe(root / name, **keys)))}
    ddp = recipe(root / "ddp", batch_size=4)
    found["ddp"] = {"done": launch(torchrun("-m", "lorafit", "train", "-r", str(ddp)), root / "ddp.log")}
    fsdp = recipe(root / "fsdp", batch_size=4, parallel="fsdp")
    script = Path(sys.executable).parent / "accelerate"  # `accelerate launch`, as users type it, where installed so
    launcher = [str(script), "launch"] if script.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    accelerate = [*launcher, "--num_processes", "2",
                  "--main_process_port", str(free_port()), "-m", "lorafit", "train", "-r", str(fsdp)]
    found["fsdp"] = {"done": launch(accelerate, root / "fsdp.log")}
    for name, values in found.items():
        values["run"] = root / name / "run"
        values["log"] = (root / f"{name}.log").read_text() if (root / f"{name}.log").exists() else ""
    for name in ("ddp", "fsdp"):
        assert found[name]["done"].returncode == 0, found[name]["log"][-3000:]
    return found


def test_two_processes_train_the_adapter_of_one_with_the_same_global_batch(runs):
    one = adapter(runs["one"]["run"])
    assert max_difference(adapter(runs["ddp"]["run"]), one) <= 1e-6
    assert max_difference(adapter(runs["accumulated"]["run"]), one) <= 1e-6
    moved = max(t.abs().max().item() for k, t in one.items() if "lora_B" in k)
    assert moved > 1e-3  # B starts at zero: the runs trained, so the comparison means something


def test_two_processes_log_the_loss_and_lr_of_one(runs):
    expected = metrics(runs["one"]["run"])
    for name in ("ddp", "accumulated"):
        found = metrics(runs[name]["run"])
        assert [m["step"] for m in found] == [m["step"] for m in expected] == [2, 4, 6]
        for mine, theirs in zip(found, expected):
            assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
            assert mine["lr"] == pytest.approx(theirs["lr"], rel=1e-12)


def test_two_processes_evaluate_like_one(runs):
    expected = runs["one"]["report"]["eval"]
    found = json.loads((runs["ddp"]["run"] / "report.json").read_text())["eval"]
    for key in ("loss", "accuracy"):
        assert found[key] == pytest.approx(expected[key], rel=1e-5)
        assert found["before"][key] == pytest.approx(expected["before"][key], rel=1e-5)
    assert found["examples"] == expected["examples"] == DATA["max_eval_examples"]


def test_only_the_main_process_writes_and_prints(runs):
    assert files(runs["ddp"]["run"]) == files(runs["one"]["run"])
    log = runs["ddp"]["log"]
    said = "2 processes take batch_size 4 × grad_accum 1 rows each: a global batch of 8 rows a step, 2 times one"
    assert log.count(said) == 1 and log.index(said) < log.index("eval before training")  # before any work
    assert log.count("eval before training") == 1
    assert log.count("eval after training") == 1
    assert log.count("lorafit run:") == 1


def test_report_records_processes_and_batches(runs):
    report = json.loads((runs["ddp"]["run"] / "report.json").read_text())
    assert (report["world_size"], report["global_batch"], report["batch_size"], report["grad_accum"]) == (2, 8, 4, 1)
    assert runs["one"]["report"]["world_size"] == 1


def test_accelerate_launch_without_gpus_starts_the_processes_it_was_asked_for(runs):
    assert "starting 2 processes" in runs["fsdp"]["log"]
    report = json.loads((runs["fsdp"]["run"] / "report.json").read_text())
    assert report["world_size"] == 2


def test_fsdp2_trains_what_ddp_trains(runs):
    assert max_difference(adapter(runs["fsdp"]["run"]), adapter(runs["ddp"]["run"])) <= 1e-5
    for mine, theirs in zip(metrics(runs["fsdp"]["run"]), metrics(runs["ddp"]["run"])):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-5)


def test_fsdp2_adapter_is_full_shaped_and_peft_loads_it_with_lorafits_logits(runs):
    import transformers
    from peft import PeftModel

    from lorafit.adapter.load import load_adapter

    folder = runs["fsdp"]["run"] / "adapter"
    tensors = adapter(runs["fsdp"]["run"])
    config = transformers.AutoConfig.from_pretrained(TINY_MODEL)
    a = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert a.shape == (2 * 4, config.n_embd) and b.shape == (3 * config.n_embd, 2 * 4)
    tokens = torch.randint(2, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
    load_adapter(ours, folder)
    theirs = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=tokens).logits, ours(input_ids=tokens).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- a stop on one rank


def test_sigterm_to_one_rank_stops_both_at_that_step_and_resumes_on_one_process(runs, tmp_path):
    path = recipe(tmp_path / "stopped", batch_size=4)
    marker = tmp_path / "marker"
    marker.mkdir()
    env = environment(TEST_MARKER=str(marker), TEST_STEP=str(STOP_AT))
    log = open(tmp_path / "stopped.log", "w")
    script = tmp_path / "pausing_rank.py"
    script.write_text(PAUSING_RANK)
    process = subprocess.Popen(torchrun(str(script), "train", "-r", str(path)), cwd=REPO, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT_S
        while not (marker / "paused").exists():
            assert process.poll() is None, (tmp_path / "stopped.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "rank 1 never reached the step to pause in"
            time.sleep(0.05)
        os.kill(int((marker / "paused").read_text()), signal.SIGTERM)
        (marker / "go").touch()
        process.wait(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    output = (tmp_path / "stopped.log").read_text()
    run = tmp_path / "stopped" / "run"
    assert process.returncode != 0
    # one rank says it, and torchrun's summary, printed last, repeats it from the error file lorafit wrote
    assert len(re.findall(r"^stopped at step 5; checkpoint saved", output, re.MULTILINE)) == 1, output[-3000:]
    assert "traceback : lorafit exit 130: stopped at step 5; checkpoint saved" in output, output[-3000:]
    assert re.search(r"exitcode\s*:\s*130", output), output[-3000:]  # torchrun names the first rank to end
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000005"]
    assert [m["step"] for m in metrics(run)] == [2, 4]

    # The same global batch on one process: batch_size may change on resume, the rows of a step do not.
    result = CliRunner().invoke(app, ["train", "-r", str(path), "--resume", "--set", "train.batch_size=8"])
    assert result.exit_code == 0, result.output
    assert max_difference(adapter(run), adapter(runs["ddp"]["run"])) <= 1e-6


def test_resume_with_another_global_batch_is_refused_and_changes_nothing(runs, tmp_path):
    run = tmp_path / "copy" / "run"
    run.parent.mkdir()
    subprocess.run(["cp", "-r", str(runs["ddp"]["run"]), str(run)], check=True)
    for step in ("adapter", "report.json"):  # as if stopped after step 3
        subprocess.run(["rm", "-r", str(run / step)], check=True)
    path = recipe(tmp_path / "copy", batch_size=4)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, ["train", "-r", str(path), "--resume"])  # 1 process × 4 ≠ 2 × 4
    assert result.exit_code == 2
    assert "global batch of 8 rows (2 processes)" in result.stderr and "gives 4" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
