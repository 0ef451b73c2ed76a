"""Job k of `make bench`: the same completion rows trained by lorafit padded (length-grouped) and packed.

Both are lorafit's own training step (`lorafit.train.step.train_step`) on copies of one model; only the batches
differ: rows padded to the longest of their batch, or `lorafit.data.packing` sequences with restarting position ids.
Steps alternate padded, packed, ... so machine noise falls on both alike; tokens/s counts real tokens only.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import time

import torch
from rich.table import Table

from lorafit.data.batches import collate, supervised_count
from lorafit.data.packing import pack
from lorafit.data.plan import StepRows
from lorafit.model.loss import loss_sum

PADDED_BATCH = 8  # rows per padded step
PACKED_BATCH = 4  # packed sequences per step: 4 × max_length token slots
MAX_LENGTH = 256
LOSS_TOLERANCE = 1e-4
NOTES = [
    (
        f"Job k: completion rows (prompt and response lengths lognormal, median 40 tokens each, cut at {MAX_LENGTH}), "
        f"trained by lorafit padded ({PADDED_BATCH} length-grouped rows a step) and packed ({PACKED_BATCH} sequences "
        f"of up to {MAX_LENGTH} tokens a step, position ids restarting per row); tokens/s counts real tokens, "
        "no padding, over every measured row once."
    ),
]


def completion_rows(vocab: int, count: int, pool: str) -> list[dict]:
    """Synthetic completion rows of mixed lengths: prompt unsupervised, response (and its end token) supervised."""
    rng = random.Random(f"lorafit-bench:k:{pool}")

    def length(most: int) -> int:
        return min(max(round(rng.lognormvariate(math.log(40), 0.8)), 4), most)

    rows = []
    for _ in range(count):
        prompt = [rng.randrange(vocab) for _ in range(length(MAX_LENGTH // 2))]
        response = [rng.randrange(vocab) for _ in range(length(MAX_LENGTH - len(prompt)))]
        rows.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return rows


def arrangements(rows: list[dict]) -> dict[str, tuple[list[dict], list[list[int]]]]:
    """name -> (what each step collates from, the steps): the rows themselves, or their packed sequences."""
    counts = [supervised_count(torch.tensor([row["labels"]])) for row in rows]
    packing = pack([len(row["input_ids"]) for row in rows], counts, MAX_LENGTH)
    packed = packing.sequences(range(len(packing)), lambda indices: [rows[i] for i in indices])
    plans = {}
    for name, items, batch in (("padded", rows, PADDED_BATCH), ("packed", packed, PACKED_BATCH)):
        order = StepRows([len(item["input_ids"]) for item in items], batch, seed=0)  # lorafit's length-grouped plan
        plans[name] = (items, [order.rows(step) for step in range(order.steps_per_epoch)])
    return plans


@torch.no_grad()
def same_loss(model: torch.nn.Module, rows: list[dict]) -> dict:
    """Summed loss of all rows padded and packed (fp32, dropout off): packing must not change it."""
    model.eval()
    losses = {name: float(loss_sum(model, collate(items, pad_id=0))[0]) for name, (items, _) in arrangements(rows).items()}
    model.train()
    difference = abs(losses["packed"] - losses["padded"]) / abs(losses["padded"])
    return {"check": "summed loss of the measured rows, packed vs padded, relative difference", "losses": losses,
            "max_relative_difference": difference, "tolerance": LOSS_TOLERANCE, "agree": difference <= LOSS_TOLERANCE}


def run_packing(args, console, *, model_config, base_model, build_lorafit, make_accelerator, machine) -> dict:
    """Job k: padded and packed lorafit steps over the same rows, alternating, with a loss-equality check first."""
    started = time.perf_counter()
    device = torch.device(args.device)
    config = model_config(args.quick)
    config._attn_implementation = args.attention
    rows = completion_rows(config.vocab_size, args.steps * PADDED_BATCH, "measured")
    warmup = completion_rows(config.vocab_size, args.warmup * PADDED_BATCH, "warmup")
    base = base_model(config, device)
    numerics = same_loss(copy.deepcopy(base).to(device), rows)
    console.print(f"job k: summed loss padded {numerics['losses']['padded']:.4f}, packed "
                  f"{numerics['losses']['packed']:.4f}", highlight=False)
    accelerator = make_accelerator(device)
    methods = {name: build_lorafit(copy.deepcopy(base), device, accelerator, args.compile) for name in ("padded", "packed")}
    del base
    alternate(methods, arrangements(warmup), device, console, "warmup")
    measured = alternate(methods, arrangements(rows), device, console, "measured")
    results = {}
    for name, steps in measured.items():
        seconds = sum(elapsed for elapsed, _ in steps)
        tokens = sum(count for _, count in steps)
        results[name] = {"label": f"lorafit {name}", "steps": len(steps), "tokens": tokens, "seconds": seconds,
                         "tokens_per_s": tokens / seconds}
    ratio = results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    return {
        "job": {"key": "k", "title": "packed vs padded completion rows of mixed lengths", "rows": len(rows),
                "max_length": MAX_LENGTH, "attention": args.attention},
        "machine": machine(device),
        "settings": {"padded_batch": PADDED_BATCH, "packed_batch": PACKED_BATCH, "measured_rows": len(rows),
                     "warmup_rows": len(warmup), "quick": args.quick},
        "methods": results,
        "numerics": numerics,
        "ratios": [{"key": "packing_tokens_per_s", "name": "tokens/s packed / padded", "value": ratio, "target": None,
                    "pass": None}],
        "notes": NOTES,
        "wall_s": time.perf_counter() - started,
    }


def alternate(methods: dict, plans: dict, device: torch.device, console, label: str) -> dict[str, list[tuple[float, int]]]:
    """One step of each arrangement in turn until both have covered every row; (seconds, real tokens) per step."""
    done = {name: [] for name in plans}
    for index, steps in enumerate(itertools.zip_longest(*(plan[1] for plan in plans.values()))):
        for name, step in zip(plans, steps):
            if step is None:
                continue
            items = [plans[name][0][i] for i in step]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            loss, tokens = methods[name].step(items)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            done[name].append((time.perf_counter() - start, tokens))
            console.print(f"  {label} step {index + 1} {name:6s} {done[name][-1][0]:7.2f} s  {len(items)} sequences, "
                          f"{tokens} tokens, loss {loss:.4f}", highlight=False)
    return done


def packing_table(result: dict) -> Table:
    job = result["job"]
    table = Table(title=f"job k: {job['title']} — {job['rows']} rows, up to {job['max_length']} tokens, "
                  f"{job['attention']} attention")
    for column in ("method", "steps", "real tokens", "time", "tokens/s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for m in result["methods"].values():
        table.add_row(m["label"], str(m["steps"]), f"{m['tokens']:,}", f"{m['seconds']:.1f} s", f"{m['tokens_per_s']:,.0f}")
    return table


def packing_markdown(result: dict) -> list[str]:
    job, settings = result["job"], result["settings"]
    lines = [f"Job k: {job['title']}: {job['rows']} rows, up to {job['max_length']} tokens, "
             f"{job['attention']} attention; padded {settings['padded_batch']} rows a step, packed "
             f"{settings['packed_batch']} sequences a step.", "",
             "| method | steps | real tokens | tokens/s |", "|---|---:|---:|---:|"]
    for m in result["methods"].values():
        lines.append(f"| {m['label']} | {m['steps']} | {m['tokens']:,} | {m['tokens_per_s']:,.0f} |")
    numerics, ratio = result["numerics"], result["ratios"][0]
    verdict = "PASS" if numerics["agree"] else "FAIL"
    lines += ["", "| ratio | measured | target |", "|---|---:|---|",
              f"| {ratio['name']} | {ratio['value']:.2f}x | — |",
              f"| {numerics['check']} | {numerics['max_relative_difference']:.1e} | <= {numerics['tolerance']:.0e} "
              f"({verdict}) |", ""]
    return lines
