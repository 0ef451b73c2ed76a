"""Job r: accuracy parity on a real model and real data: lorafit against peft + a plain AdamW loop.

The model (llama2.c's stories260K, pretrained on TinyStories) and the data (GLUE's SST-2) are prepared by
bench/fetch_parity_data.py into bench/.data/; without them the job is skipped with the command that makes them.
Both methods train LoRA r=16 on q and v with the same rows, budget and seeds, and are scored on every held-out
row by the log-likelihood of each label word. lorafit runs through its public entry (`lorafit.train.loop.train`
with a recipe built here); the plain loop uses only transformers and peft, with its own tokenization, batches
and scoring, so that it is an independent reference.
"""

from __future__ import annotations

import io
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

DATA = Path(__file__).resolve().parent / ".data"
MODEL, SST2 = DATA / "stories260K", DATA / "sst2"
RANK, ALPHA, LR, BATCH, MAX_LENGTH, MAX_GRAD_NORM = 16, 16, 5e-3, 16, 128, 1.0
TEMPLATE, LABELS = "Review: {text}\nSentiment:", ("negative", "positive")
SEEDS, STEPS = (0, 1, 2), 600  # at 300 steps both methods are still near the base model's 0.51
NO_LOSS = -100


def missing() -> str | None:
    """Why the job cannot run here, or None."""
    needed = [MODEL / "model.safetensors", SST2 / "train.jsonl", SST2 / "validation.jsonl"]
    if all(path.exists() for path in needed):
        return None
    return "bench/.data/ lacks the real model or data; run python bench/fetch_parity_data.py (bench/README.md, job r)"


def read_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SST2 / f"{name}.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- lorafit, through its public entry


def lorafit_run(seed: int, steps: int, run_dir: Path) -> dict:
    """lorafit's report for one seed: the recipe a user would write, built in code."""
    from lorafit.recipe_file import validate
    from lorafit.train.loop import train

    recipe = validate({
        "model": {"name": str(MODEL), "dtype": "float32"},
        "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "targets": ["q", "v"]},
        "data": {"source": {"train": str(SST2 / "train.jsonl"), "validation": str(SST2 / "validation.jsonl")},
                 "task": "classification", "text_field": "sentence", "label_field": "label", "labels": list(LABELS),
                 "template": TEMPLATE, "max_length": MAX_LENGTH},
        "train": {"max_steps": steps, "batch_size": BATCH, "lr": LR, "schedule": "linear", "warmup_steps": 0,
                  "weight_decay": 0.0, "max_grad_norm": MAX_GRAD_NORM, "seed": seed, "save_every": 0,
                  "log_every": max(1, steps), "mixed_precision": "no"},
        "output": {"dir": str(run_dir)},
    })
    return train(recipe, console=Console(file=io.StringIO()))


# --------------------------------------------------------------------------- peft + a plain AdamW loop


def encode(tokenizer, rows: list[dict], label_ids: list[list[int]]) -> list[dict]:
    """{prompt ids, label} per row; a review too long for MAX_LENGTH with its label loses words from its end."""
    prompts = tokenizer([TEMPLATE.format(text=row["sentence"]) for row in rows]).input_ids
    encoded = []
    for row, prompt in zip(rows, prompts):
        words = row["sentence"].split()
        while len(prompt) + len(label_ids[row["label"]]) > MAX_LENGTH and words:
            words.pop()
            prompt = tokenizer(TEMPLATE.format(text=" ".join(words))).input_ids
        encoded.append({"prompt": prompt, "label": row["label"]})
    return encoded


def padded(sequences: list[list[int]], supervised_from: list[int], pad_id: int) -> dict:
    """Right-padded ids, attention mask and labels that carry loss only from each row's `supervised_from` on."""
    longest = max(map(len, sequences))
    ids = torch.full((len(sequences), longest), pad_id)
    labels = torch.full((len(sequences), longest), NO_LOSS)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, (seq, start) in enumerate(zip(sequences, supervised_from)):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, start : len(seq)] = torch.tensor(seq[start:])
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def plain_accuracy(model, rows: list[dict], label_ids: list[list[int]], pad_id: int) -> float:
    """Share of rows whose own label word has the highest summed log-probability after the prompt."""
    model.eval()
    correct = 0
    for start in range(0, len(rows), 32):
        chunk = rows[start : start + 32]
        scores = []
        for ids in label_ids:
            batch = padded([row["prompt"] + ids for row in chunk], [len(row["prompt"]) for row in chunk], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logprobs = logits.log_softmax(-1)
            targets = batch["labels"][:, 1:]
            picked = logprobs[:, :-1].gather(2, targets.clamp(min=0)[..., None])[..., 0]
            scores.append((picked * (targets != NO_LOSS)).sum(1))
        predicted = torch.stack(scores, 1).argmax(1)
        correct += int((predicted == torch.tensor([row["label"] for row in chunk])).sum())
    model.train()
    return correct / len(rows)


def plain_data() -> dict:
    """The plain loop's rows, tokenized once for every seed."""
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    label_ids = [tokenizer(" " + word, add_special_tokens=False).input_ids for word in LABELS]
    return {"label_ids": label_ids, "train": encode(tokenizer, read_rows("train"), label_ids),
            "held_out": encode(tokenizer, read_rows("validation"), label_ids),
            "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}


def plain_run(data: dict, seed: int, steps: int) -> dict:
    """peft LoRA on q_proj and v_proj, shuffled batches, transformers' loss, clip, torch AdamW, linear decay."""
    label_ids, train_rows, held_out, pad_id = data["label_ids"], data["train"], data["held_out"], data["pad_id"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    before = plain_accuracy(model, held_out, label_ids, pad_id)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))
    rng, order = random.Random(seed), []
    start = time.perf_counter()
    for _ in range(steps):
        if len(order) < BATCH:
            order += rng.sample(range(len(train_rows)), len(train_rows))
        chosen, order = [train_rows[i] for i in order[:BATCH]], order[BATCH:]
        batch = padded([row["prompt"] + label_ids[row["label"]] for row in chosen],
                       [len(row["prompt"]) for row in chosen], pad_id)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - start
    return {"accuracy": plain_accuracy(model, held_out, label_ids, pad_id), "before": before,
            "examples": len(held_out), "train_s": train_s}


# --------------------------------------------------------------------------- the job


def mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def run_parity(args, console: Console, machine) -> dict:
    """Per-seed accuracies of both methods, their means ± standard errors, and the parity target."""
    steps, chosen = args.parity_steps, [int(seed) for seed in args.parity_seeds.split(",")]
    job = {"key": "r", "title": "accuracy parity on real data (stories260K on SST-2)", "steps": steps,
           "seeds": chosen, "batch_size": BATCH, "max_length": MAX_LENGTH, "rank": RANK, "lr": LR}
    reason = missing()
    if reason:
        return {"job": job, "skipped": reason, "machine": machine(torch.device("cpu"))}
    seeds, data = [], plain_data()
    for seed in chosen:
        with tempfile.TemporaryDirectory() as work:
            report = lorafit_run(seed, steps, Path(work) / "run")
        plain = plain_run(data, seed, steps)
        seeds.append({"seed": seed, "lorafit": report["eval"]["accuracy"], "peft": plain["accuracy"],
                      "lorafit_examples": report["eval"]["examples"], "peft_examples": plain["examples"],
                      "lorafit_before": report["eval"]["before"]["accuracy"], "peft_before": plain["before"],
                      "lorafit_train_s": report["throughput"]["wall_s"], "peft_train_s": plain["train_s"]})
        console.print(f"  job r: seed {seed}: lorafit {seeds[-1]['lorafit']:.3f}, peft {plain['accuracy']:.3f}",
                      highlight=False)
    methods = {key: dict(zip(("mean", "se"), mean_se([s[key] for s in seeds]))) for key in ("lorafit", "peft")}
    gap, se = methods["lorafit"]["mean"] - methods["peft"]["mean"], methods["peft"]["se"]
    total = len(read_rows("validation"))
    scored = {s[f"{key}_examples"] for s in seeds for key in ("lorafit", "peft")}
    return {
        "job": job, "machine": machine(torch.device("cpu")), "seeds": seeds, "methods": methods,
        "ratios": [{"key": "accuracy_gap", "name": "lorafit mean − peft mean", "value": gap, "unit": "points",
                    "target": f">= −1 SE of peft ({-se:+.1%})", "pass": gap >= -se}],
        "numerics": {"check": f"held-out rows scored of {total}", "rows_scored": sorted(scored),
                     "target": f"all {total}", "agree": scored == {total}},
        "notes": [
            "Job r: lorafit's recipe and peft + torch.optim.AdamW share rank 16 (alpha 16) on q_proj and v_proj, "
            f"batch {BATCH}, lr {LR} decaying linearly to 0, dropout 0, weight decay 0, clipping at 1.0, max_length "
            f"{MAX_LENGTH}; the plain loop shuffles, tokenizes and scores on its own.",
        ],
    }


def mean_cell(method: dict) -> str:
    return f"{method['mean']:.3f} ± {method['se']:.3f}"


def parity_table(result: dict) -> Table:
    job = result["job"]
    table = Table(title=f"job r: {job['title']} — {job['steps']} steps, batch {job['batch_size']}, lr {job['lr']}")
    for column in ("seed", "lorafit", "peft + AdamW", "base model"):
        table.add_column(column, justify="right")
    for s in result["seeds"]:
        table.add_row(str(s["seed"]), f"{s['lorafit']:.3f}", f"{s['peft']:.3f}", f"{s['lorafit_before']:.3f}")
    lorafit, plain = result["methods"]["lorafit"], result["methods"]["peft"]
    table.add_row("mean ± SE", mean_cell(lorafit), mean_cell(plain), "")
    return table


def parity_markdown(result: dict) -> list[str]:
    job = result["job"]
    if "skipped" in result:
        return [f"Job r: {job['title']}: skipped, {result['skipped']}.", ""]
    lines = [f"Job r: {job['title']}, {job['steps']} steps, batch {job['batch_size']}, lr {job['lr']} linear, "
             f"every held-out row scored.", "", "| seed | lorafit | peft + AdamW |", "|---:|---:|---:|"]
    lines += [f"| {s['seed']} | {s['lorafit']:.3f} | {s['peft']:.3f} |" for s in result["seeds"]]
    lorafit, plain = result["methods"]["lorafit"], result["methods"]["peft"]
    ratio = result["ratios"][0]
    lines += [f"| mean ± SE | {mean_cell(lorafit)} | {mean_cell(plain)} |",
              "", f"Target {ratio['target']}: {ratio['value']:+.1%} ({'PASS' if ratio['pass'] else 'MISS'}).", ""]
    return lines
