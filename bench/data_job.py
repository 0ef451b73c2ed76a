"""Job s of `make bench`: what a training start costs as the data grows (peak RSS and start-up time).

Two synthetic text sets of 1M and 8M tokens (`task = "text"`, ~201 tokens a row, words that the shipped tiny GPT-2
tokenizer reads as one token each) are trained on by the shipped tiny model. Per set, in fresh processes: a first
start that tokenizes (timed, not part of the targets), then a start on the warm cache that does what `train` does
with its data before the first step (read the tokenized split, plan the steps, the data fingerprint, collate the
first step), timed and with its peak RSS, and a whole 5-step `lorafit train` with its peak RSS. The targets are
growth figures measured side by side: (8M set - 1M set) / the difference in tokens (RSS) or rows (time).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "data" / "tiny-gpt2"
WORDS_PER_ROW = 199  # one token each, plus the first word's and the end token: ~201 tokens a row
SIZES = {"1M": 1_000_000, "8M": 8_000_000}
QUICK_SIZES = {"100k": 100_000, "800k": 800_000}
BATCH, STEPS = 16, 5
RUNS = 3  # whole runs per set; the lowest peaks are kept (what else runs on the machine only adds)
RSS_TARGET = 2.0  # bytes of peak RSS per training token, at most
START_TARGET = 2.0  # seconds of start-up per million rows, at most (tokenizing excluded)
NOTES = [
    "Job s: synthetic text sets (task = \"text\", ~201 tokens a row) on the shipped tiny GPT-2. \"data start\" = a "
    "fresh process reading the tokenized split from the warm cache, planning the steps, hashing the rows for resume "
    "and collating the first step, as `train` does before its first step; \"whole run\" = `lorafit train` for 5 "
    "steps on the warm cache (the lowest of 3 runs). Peak RSS is VmHWM, which also counts the pages of the "
    "memory-mapped cache that were read (shared by a machine's processes, dropped by the kernel at will); anonymous "
    "is the peak of RssAnon read every 2 ms, the process's own memory, which the targets are on. Targets are growth "
    "from the small set to the large one: per token, and start-up seconds per million rows; the first start's "
    "tokenizing is shown, not counted.",
]


def write_text_set(folder: Path, tokens: int) -> tuple[Path, int]:
    """A JSON-lines text set of about `tokens` tokens; returns (its recipe, rows)."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(TINY_MODEL).get_vocab()
    words = sorted(word[1:] for word in vocab if word.startswith("Ġ") and word[1:].isalpha() and word[1:].islower())
    rng = random.Random(f"lorafit-bench:d:{tokens}")
    rows = tokens // (WORDS_PER_ROW + 2)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w", encoding="utf-8") as file:
        for _ in range(rows):
            file.write(json.dumps({"text": " ".join(rng.choices(words, k=WORDS_PER_ROW))}) + "\n")
    recipe = (f'[model]\nname = "{TINY_MODEL}"\n[data]\nsource = "{folder / "train.jsonl"}"\ntask = "text"\n'
              f'eval_split = ""\nmax_length = 256\n[train]\nmax_steps = {STEPS}\nbatch_size = {BATCH}\n'
              f"save_every = 0\nlog_every = {STEPS}\n")
    (folder / "recipe.toml").write_text(recipe)
    return folder / "recipe.toml", rows


def data_start(recipe_path: str) -> dict:
    """In this (fresh) process: the data half of `train`'s start, timed, with its peak RSS."""
    import torch

    from lorafit.data.batches import collate
    from lorafit.data.plan import plan_training
    from lorafit.data.tokenize import tokenize_split
    from lorafit.model.load import load_tokenizer
    from lorafit.recipe_file import load_recipe

    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(recipe.model.name)
    collate([{"input_ids": [1, 2], "labels": [1, 2]}], 0)  # torch's own first allocations, made before data in a run
    torch.set_num_threads(1)
    with AnonymousPeak() as anonymous:
        wall, cpu = time.perf_counter(), time.process_time()
        split = tokenize_split(recipe.data, tokenizer, recipe.data.train_split)
        read = time.perf_counter() - wall
        plan = plan_training(recipe, split, BATCH)
        fingerprint = plan.fingerprint()
        collate(plan.units(plan.steps.rows(0)), tokenizer.pad_token_id)
        seconds, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "read_seconds": read, "peak_rss": _kib("VmHWM") * 1024,
            "peak_anonymous": anonymous.peak, "rows": len(split.examples), "tokens": int(plan.lengths.sum()),
            "fingerprint": fingerprint}


def whole_run(recipe_path: str, output: str) -> dict:
    """In this (fresh) process: `lorafit train --recipe RECIPE --output OUTPUT --json`, with its peak RSS."""
    import runpy

    sys.argv = ["lorafit", "train", "--recipe", recipe_path, "--output", output, "--json"]
    with AnonymousPeak() as anonymous:
        try:
            runpy.run_module("lorafit", run_name="__main__")
        except SystemExit as stop:
            if stop.code:
                raise
    return {"peak_rss": _kib("VmHWM") * 1024, "peak_anonymous": anonymous.peak}


class AnonymousPeak(threading.Thread):
    """The highest RssAnon of this process while in the `with` block, read every 2 ms: the memory that is this
    process's alone. Peak RSS (VmHWM) also counts the pages of the memory-mapped cache files that were read, which
    every process of a machine shares and the kernel may drop at any time."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.002):
            self.peak = max(self.peak, _kib("RssAnon") * 1024)

    def __enter__(self) -> AnonymousPeak:
        self.peak = _kib("RssAnon") * 1024
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()
        self.peak = max(self.peak, _kib("RssAnon") * 1024)


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(mode: str, *arguments: str, env: dict) -> dict:
    """This file run as `mode` in a fresh process: the JSON line it ends with."""
    command = [sys.executable, __file__, mode, *arguments]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"job s: {' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stderr.strip().splitlines()[-1])


def run_data(args, console, *, machine) -> dict:
    """Job s: for each set, a tokenizing start, a measured start on the warm cache and a whole 5-step run."""
    import torch

    started = time.perf_counter()
    sizes = QUICK_SIZES if args.quick else SIZES
    results = {}
    with tempfile.TemporaryDirectory(prefix="lorafit-bench-data-") as scratch:
        # glibc returns blocks of 128 KiB or more when they are freed, so RSS follows what is held (job a's reason)
        env = {**os.environ, "HF_DATASETS_CACHE": str(Path(scratch) / "cache"), "HF_HUB_OFFLINE": "1",
               "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO),
               "MALLOC_MMAP_THRESHOLD_": "131072"}
        for name, tokens in sizes.items():
            recipe, rows = write_text_set(Path(scratch) / name, tokens)
            # the first start tokenizes and fills the cache; the second is measured
            first, warm = (_child("--data-start", str(recipe), env=env) for _ in range(2))
            runs = [_child("--whole-run", str(recipe), str(recipe.parent / f"run-{i}"), env=env) for i in range(RUNS)]
            results[name] = {"label": f"{name} tokens", "rows": rows, "tokens": warm["tokens"],
                             "tokenize_s": first["seconds"], "start_s": warm["seconds"],
                             "start_cpu_s": warm["cpu_seconds"], "read_s": warm["read_seconds"],
                             "start_peak_rss": warm["peak_rss"], "start_peak_anonymous": warm["peak_anonymous"],
                             "run_peak_rss": min(run["peak_rss"] for run in runs),
                             "run_peak_anonymous": min(run["peak_anonymous"] for run in runs),
                             "same_rows": first["fingerprint"] == warm["fingerprint"]}
            console.print(f"  job s: {name}: {rows:,} rows, tokenizing start {first['seconds']:.1f} s, warm start "
                          f"{warm['seconds']:.2f} s, whole run peak {results[name]['run_peak_rss'] / 2**20:,.0f} MiB",
                          highlight=False)
    small, large = results.values()
    tokens, rows = large["tokens"] - small["tokens"], large["rows"] - small["rows"]

    def growth(key: str) -> float:
        return (large[key] - small[key]) / tokens

    ratios = [
        _ratio("data_start_anonymous_per_token", "data start: peak anonymous RSS growth per token",
               growth("start_peak_anonymous"), "bytes", RSS_TARGET),
        _ratio("run_anonymous_per_token", "whole run: peak anonymous RSS growth per token",
               growth("run_peak_anonymous"), "bytes", RSS_TARGET),
        _ratio("data_start_rss_per_token", "data start: peak RSS growth per token (with mapped cache pages)",
               growth("start_peak_rss"), "bytes", None),
        _ratio("run_rss_per_token", "whole run: peak RSS growth per token (with mapped cache pages)",
               growth("run_peak_rss"), "bytes", None),
        _ratio("start_s_per_million_rows", "data start: seconds per million rows (wall)",
               (large["start_s"] - small["start_s"]) / rows * 1e6, "s", START_TARGET),
        _ratio("start_cpu_s_per_million_rows", "data start: CPU seconds per million rows",
               (large["start_cpu_s"] - small["start_cpu_s"]) / rows * 1e6, "s", None),
    ]
    same = all(result["same_rows"] for result in results.values())
    return {
        "job": {"key": "s", "title": "training start as the data grows", "sizes": list(sizes), "batch_size": BATCH},
        "machine": machine(torch.device("cpu")),
        "settings": {"words_per_row": WORDS_PER_ROW, "steps": STEPS, "quick": args.quick},
        "methods": results,
        "numerics": {"check": "warm start's rows differ from the tokenizing start's (0 = same)",
                     "max_abs_difference": 0.0 if same else 1.0, "tolerance": 0.0, "agree": same},
        "ratios": ratios,
        "notes": NOTES,
        "wall_s": time.perf_counter() - started,
    }


def _ratio(key: str, name: str, value: float, unit: str, target: float | None) -> dict:
    return {"key": key, "name": name, "value": value, "unit": unit,
            "target": f"<= {target:g} {unit}" if target is not None else None,
            "pass": value <= target if target is not None else None}


def _peaks(measured: dict, which: str) -> str:
    return (f"{measured[f'{which}_peak_rss'] / 2**20:,.0f} MiB "
            f"({measured[f'{which}_peak_anonymous'] / 2**20:,.0f} MiB)")


def data_table(result: dict) -> Table:
    table = Table(title=f"job s: {result['job']['title']} — batch {result['job']['batch_size']}, tiny GPT-2")
    for column in ("set", "rows", "tokens", "tokenizing start", "warm start", "of which reading", "start peak RSS "
                   "(anonymous)", "whole run peak RSS (anonymous)"):
        table.add_column(column, justify="left" if column == "set" else "right")
    for m in result["methods"].values():
        table.add_row(m["label"], f"{m['rows']:,}", f"{m['tokens']:,}", f"{m['tokenize_s']:.1f} s",
                      f"{m['start_s']:.2f} s", f"{m['read_s']:.2f} s", _peaks(m, "start"), _peaks(m, "run"))
    return table


def data_markdown(result: dict) -> list[str]:
    lines = [f"Job s: {result['job']['title']}: synthetic text sets on the shipped tiny GPT-2, batch "
             f"{result['job']['batch_size']}.", "",
             "| set | rows | tokens | tokenizing start | warm start | start peak RSS (anonymous) | "
             "whole run peak RSS (anonymous) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m in result["methods"].values():
        lines.append(f"| {m['label']} | {m['rows']:,} | {m['tokens']:,} | {m['tokenize_s']:.1f} s | "
                     f"{m['start_s']:.2f} s | {_peaks(m, 'start')} | {_peaks(m, 'run')} |")
    lines += ["", "| ratio | measured | target |", "|---|---:|---|"]
    for ratio in result["ratios"]:
        verdict = "" if ratio["pass"] is None else f" ({'PASS' if ratio['pass'] else 'MISS'})"
        lines.append(f"| {ratio['name']} | {ratio['value']:.2f} {ratio['unit']} | {ratio['target'] or '—'}{verdict} |")
    return lines + [""]


if __name__ == "__main__" and sys.argv[1:2] == ["--data-start"]:
    print(json.dumps(data_start(sys.argv[2])), file=sys.stderr)
if __name__ == "__main__" and sys.argv[1:2] == ["--whole-run"]:
    measured = whole_run(*sys.argv[2:4])  # the run's own --json goes to stdout
    print(json.dumps(measured), file=sys.stderr)
