"""Peak memory of LoRA training steps on a GPT-2-small-shaped model: bf16 frozen weights vs NF4 (QLoRA).

    python bench/qlora_memory.py [--steps 3] [--quick]

Each setting runs in a fresh child process (the two side by side) (bench/run.py's method): random bf16 weights, LoRA r=8 on q and v
set up by lorafit.train.step.prepare_model (with quantize="nf4" for the 4-bit base), a few AdamW steps on job a's
worst-case batch (16 rows, the longest). Reported above the RSS before the model was built: the resident
model after set-up, and the peak of the steps (VmHWM reset after set-up). On a GPU, max_memory_allocated.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402
    SEED,
    base_model,
    define_jobs,
    live_memory_env,
    make_accelerator,
    make_rows,
    model_config,
    read_status_kib,
    reset_peak_rss,
    worst_case_batch,
)

from lorafit.data.batches import collate
from lorafit.model.loss import SupervisedLoss
from lorafit.model.quantize import require_torchao
from lorafit.recipe import LoraSection, TrainSection  # noqa: E402
from lorafit.train.optimizer import build_optimizer
from lorafit.train.step import prepare_model, train_step


def measure(quantize: str, steps: int, quick: bool, device: torch.device, batch_size: int) -> dict:
    job = define_jobs(quick, gpu=device.type == "cuda")["a"]
    config = model_config(job, quick)
    rows = make_rows(job, config.vocab_size, 64, "measured")
    batch = collate([rows[i] for i in worst_case_batch(rows, batch_size)], config.eos_token_id)
    require_torchao()  # both settings import it before the baseline, so neither counts the library
    baseline = read_status_kib("VmRSS")
    model = base_model(config, torch.device("cpu")).to(torch.bfloat16)
    prepare_model(model, LoraSection(rank=8, alpha=16, dropout=0.0, targets=["q", "v"]), quantize=quantize)
    accelerator = make_accelerator(device)
    optimizer, scheduler = build_optimizer(model, TrainSection(lr=1e-4, schedule="constant", seed=SEED), 1)
    scorer, optimizer = accelerator.prepare(SupervisedLoss(model), optimizer)
    gc.collect()
    resident = (read_status_kib("VmRSS") - baseline) * 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()
    losses = [train_step(accelerator, scorer, optimizer, scheduler, [batch], max_grad_norm=1.0)[0].item()
              for _ in range(steps)]
    if device.type == "cuda":
        return {"quantize": quantize, "peak_bytes": torch.cuda.max_memory_allocated(device), "losses": losses,
                "kind": "CUDA max_memory_allocated"}
    return {"quantize": quantize, "resident_bytes": resident, "peak_bytes": (read_status_kib("VmHWM") - baseline) * 1024,
            "losses": losses, "kind": "RSS above the RSS before the model was built"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="rows per step (job a's batch by default)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, for a smoke test")
    parser.add_argument("--child", choices=["none", "nf4"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.quick, torch.device(args.device), args.batch)))
        return 0
    children = {}
    for quantize in ("none", "nf4"):  # side by side: each measures its own process's memory
        command = [sys.executable, __file__, "--child", quantize, "--steps", str(args.steps), "--device", args.device,
                   "--batch", str(args.batch)] + ["--quick"] * args.quick
        children[quantize] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              env=live_memory_env())
    results = {}
    for quantize, child in children.items():
        out, err = child.communicate()
        if child.returncode:
            print(err[-3000:], file=sys.stderr)
            return 1
        results[quantize] = json.loads(out.strip().splitlines()[-1])
    mib = 1 << 20
    for name, result in results.items():
        resident = f"resident {result['resident_bytes'] / mib:,.0f} MiB, " if "resident_bytes" in result else ""
        print(f"{'bf16' if name == 'none' else name}: {resident}steps' peak {result['peak_bytes'] / mib:,.0f} MiB "
              f"({result['kind']}); losses {[round(x, 4) for x in result['losses']]}")
    print(f"peak ratio nf4 / bf16: {results['nf4']['peak_bytes'] / results['none']['peak_bytes']:.3f}")
    if "resident_bytes" in results["nf4"]:
        print(f"resident ratio nf4 / bf16: {results['nf4']['resident_bytes'] / results['none']['resident_bytes']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
