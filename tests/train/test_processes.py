"""Several processes give the result of one: gloo processes on CPU, started the way users start them.

One uninterrupted 2-process DDP run (torchrun), one FSDP2 run (accelerate launch, no --multi_gpu), one
4-process HSDP run as 2 × 2 (torchrun) and one 2-process run stopped by SIGTERM to one rank are compared with
in-process 1-process runs of the same global batch: 1 × batch 8 and 1 × batch 4 × grad_accum 2, all with LoRA
dropout 0.1 on a tiny GPT-2 whose config keeps its own dropout (attn_pdrop = resid_pdrop = embd_pdrop = 0.1),
under the default recipe otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_MODEL, write_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.recipe import load_recipe
from lorafit.train.loop import train

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("processes")]

TRAIN = {"max_steps": 6, "log_every": 2, "save_every": 3, "lr": 1e-3, "eval_batch_size": 4, "seed": 11,
         "peak_tflops": 0.5}  # a made-up peak, so that CPU runs report an MFU
GPT2_DROPOUT = {"attn_pdrop": 0.1, "resid_pdrop": 0.1, "embd_pdrop": 0.1}  # GPT-2's own, as its hub config has them
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


def torchrun(*args: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(free_port()), *args]


def launch(command: list[str], log: Path, **env: str) -> subprocess.CompletedProcess:
    with open(log, "w") as output:
        return subprocess.run(command, cwd=REPO, env=environment(**env), stdout=output, stderr=subprocess.STDOUT,
                              timeout=WAIT_S, check=False)


def dropout_gpt2(folder: Path) -> Path:
    """The shipped tiny GPT-2 with its own dropout on, as GPT-2's hub config has it."""
    shutil.copytree(TINY_MODEL, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **GPT2_DROPOUT}))
    return folder


def recipe(folder: Path, model: Path | None = None, **train_keys) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = {"name": str(model)} if model else {}
    return write_recipe(folder, model=model, train={**TRAIN, **train_keys}, lora=LORA, data=DATA)


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
    gpt2 = dropout_gpt2(root / "gpt2-with-dropout")
    found = {}
    for name, keys in (("one", {"batch_size": 8}), ("accumulated", {"batch_size": 4, "grad_accum": 2})):
        found[name] = {"report": train(load_recipe(recipe(root / name, gpt2, **keys)))}
    ddp = recipe(root / "ddp", gpt2, batch_size=4)
    found["ddp"] = {"done": launch(torchrun("-m", "lorafit", "train", "-r", str(ddp)), root / "ddp.log")}
    fsdp = recipe(root / "fsdp", gpt2, batch_size=4, parallel="fsdp")
    script = Path(sys.executable).parent / "accelerate"  # `accelerate launch`, as users type it, where installed so
    launcher = [str(script), "launch"] if script.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    accelerate = [*launcher, "--num_processes", "2",
                  "--main_process_port", str(free_port()), "-m", "lorafit", "train", "-r", str(fsdp)]
    found["fsdp"] = {"done": launch(accelerate, root / "fsdp.log")}
    # 4 processes on one machine as 2 machines × 2: shard_size says how many share one sharded copy
    hsdp = recipe(root / "hsdp", gpt2, batch_size=2, parallel="hsdp", shard_size=2)
    found["hsdp"] = {"done": launch(torchrun("-m", "lorafit", "train", "-r", str(hsdp), processes=4), root / "hsdp.log")}
    for name, values in found.items():
        values["run"] = root / name / "run"
        values["log"] = (root / f"{name}.log").read_text() if (root / f"{name}.log").exists() else ""
    for name in ("ddp", "fsdp", "hsdp"):
        assert found[name]["done"].returncode == 0, found[name]["log"][-3000:]
    found["gpt2"] = gpt2
    return found


def test_two_processes_train_the_adapter_of_one_with_the_same_global_batch(runs):
    one = adapter(runs["one"]["run"])
    assert max_difference(adapter(runs["ddp"]["run"]), one) <= 1e-6
    assert max_difference(adapter(runs["accumulated"]["run"]), one) <= 1e-6
    moved = max(t.abs().max().item() for k, t in one.items() if "lora_B" in k)
    assert moved > 1e-3  # B starts at zero: the runs trained, so the comparison means something


def test_the_models_own_dropout_is_off_by_default_so_the_guarantee_holds_for_gpt2(runs):
    """The model's config keeps GPT-2's dropout at 0.1; the default [model] dropout = "off" switches it off."""
    saved = tomllib.loads((runs["one"]["run"] / "recipe.toml").read_text())
    config = json.loads((Path(saved["model"]["name"]) / "config.json").read_text())
    assert {key: config[key] for key in GPT2_DROPOUT} == GPT2_DROPOUT
    assert saved["model"]["dropout"] == "off"


def test_hsdp_on_four_processes_as_two_by_two_trains_the_adapter_of_one(runs):
    assert max_difference(adapter(runs["hsdp"]["run"]), adapter(runs["one"]["run"])) <= 1e-5
    for mine, theirs in zip(metrics(runs["hsdp"]["run"]), metrics(runs["one"]["run"])):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-5)
    report = json.loads((runs["hsdp"]["run"] / "report.json").read_text())
    assert (report["world_size"], report["global_batch"]) == (4, 8)
    assert report["mesh"] == {"replicate": 2, "shard": 2}  # a 2-D mesh: sharded within 2 processes, replicated
    assert files(runs["hsdp"]["run"]) == files(runs["one"]["run"])


def test_mfu_is_per_device_with_a_given_peak(runs):
    """Tokens/s counts every process's tokens; MFU divides by the processes, so it is one device's share."""
    for name, world in (("one", 1), ("ddp", 2), ("hsdp", 4)):
        throughput = json.loads((runs[name]["run"] / "report.json").read_text())["throughput"]
        per_device = throughput["model_flops_per_token"] * throughput["tokens_per_s"] / world
        assert throughput["mfu"] == pytest.approx(per_device / (TRAIN["peak_tflops"] * 1e12), rel=1e-9)
        assert throughput["devices"] == world


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
    assert "mesh" not in report  # DDP: every process holds the whole model
    assert runs["one"]["report"]["world_size"] == 1


def test_accelerate_launch_without_gpus_starts_the_processes_it_was_asked_for(runs):
    assert "starting 2 processes" in runs["fsdp"]["log"]
    report = json.loads((runs["fsdp"]["run"] / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["mesh"] == {"shard": 2}


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
    path = recipe(tmp_path / "stopped", runs["gpt2"], batch_size=4)
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
    path = recipe(tmp_path / "copy", runs["gpt2"], batch_size=4)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, ["train", "-r", str(path), "--resume"])  # 1 process × 4 ≠ 2 × 4
    assert result.exit_code == 2
    assert "global batch of 8 rows (2 processes)" in result.stderr and "gives 4" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_run_sharded_by_fsdp2_resumes_on_one_process_with_ddp(runs, tmp_path):
    """FSDP2 gathers whole tensors into its checkpoints, so [train] parallel may change on resume."""
    run = tmp_path / "fsdp" / "run"
    shutil.copytree(runs["fsdp"]["run"], run)
    for written_later in ("adapter", "checkpoints/step-000006"):  # as if stopped after step 3
        shutil.rmtree(run / written_later)
    (run / "report.json").unlink()
    path = recipe(tmp_path / "fsdp", runs["gpt2"], batch_size=4, parallel="fsdp")
    result = CliRunner().invoke(app, ["train", "-r", str(path), "--resume", "--set", "train.batch_size=8",
                                      "--set", "train.parallel=ddp"])
    assert result.exit_code == 0, result.output
    assert max_difference(adapter(run), adapter(runs["fsdp"]["run"])) <= 1e-5


# ---------------------------------------------------------------- processes that cannot reach each other


def test_processes_that_cannot_connect_stop_at_once_with_one_line(tmp_path):
    """A wrong network interface fails while the processes connect, before any data or weight is read."""
    path = recipe(tmp_path, batch_size=4)
    done = launch(torchrun("-m", "lorafit", "train", "-r", str(path)), tmp_path / "log", GLOO_SOCKET_IFNAME="lorafit0")
    output = (tmp_path / "log").read_text()
    assert done.returncode != 0
    # one rank says it; torchrun's summary repeats it from the error file lorafit wrote
    assert len(re.findall(r"^error: the processes could not connect to each other", output, re.MULTILINE)) == 1, \
        output[-3000:]
    assert "GLOO_SOCKET_IFNAME" in output and re.search(r"exitcode\s*:\s*2", output), output[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_vote_group_that_cannot_connect_is_one_line(monkeypatch):
    import torch.distributed as dist

    from lorafit.errors import LorafitError
    from lorafit.train import processes

    def unreachable(**options):
        raise RuntimeError("Connection closed by peer\n[gloo] Timed out waiting 60000ms for connection")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *group: 2)
    monkeypatch.setattr(dist, "new_group", unreachable)
    monkeypatch.setattr(processes, "_votes", None)
    with pytest.raises(LorafitError, match=r"could not connect to each other \(\[gloo\] Timed out") as refused:
        processes.connect_votes()
    assert "\n" not in str(refused.value)


# ---------------------------------------------------------------- a mixture-of-experts model, sharded by FSDP2


def test_fsdp2_on_two_processes_trains_the_expert_adapter_of_one_process(tmp_path):
    """The shipped tiny Qwen3-MoE with LoRA on q, v (dropout keyed by row) and its experts' stacks: FSDP2 shards each
    decoder block, its stacked experts and their LoRA with it, over 2 processes; 1 process runs the same global batch."""
    moe = {"model": {"name": str(REPO / "data" / "tiny-moe")}, "lora": {**LORA, "targets": ["q", "v", "experts"]},
           "data": DATA}
    one = write_recipe(tmp_path, train={**TRAIN, "batch_size": 8}, output={"dir": str(tmp_path / "one")}, **moe)
    train(load_recipe(one))
    (tmp_path / "fsdp").mkdir()
    fsdp = write_recipe(tmp_path / "fsdp", train={**TRAIN, "batch_size": 4, "parallel": "fsdp"}, **moe)
    done = launch(torchrun("-m", "lorafit", "train", "-r", str(fsdp)), tmp_path / "fsdp.log")
    assert done.returncode == 0, (tmp_path / "fsdp.log").read_text()[-3000:]
    ours, theirs = adapter(tmp_path / "fsdp" / "run"), adapter(tmp_path / "one")
    assert any(".experts.base_layer.lora_B" in key for key in ours)  # both stacks of each MoE layer trained
    assert max_difference(ours, theirs) <= 1e-5
    assert max(t.abs().max().item() for k, t in theirs.items() if "experts" in k and "lora_B" in k) > 1e-3
    for mine, single in zip(metrics(tmp_path / "fsdp" / "run"), metrics(tmp_path / "one"), strict=True):
        assert mine["loss"] == pytest.approx(single["loss"], rel=1e-5, abs=1e-5)
