"""Jobs d, f and g of `make bench`: the pieces of a lorafit step measured side by side with what they replace.

- d: keyed LoRA dropout (lorafit.lora.dropout.apply_keyed) against torch's own dropout, forward and backward
  on one [tokens, features] activation (target: median time at most 1.3x torch's).
- f: the fused LoRA projection (lorafit.lora.fused) against the plain autograd path, and the chunked head
  cross-entropy (lorafit.model.loss.HeadCrossEntropy, a fused linear cross-entropy) against full logits:
  time of forward and backward, and the bytes autograd keeps for backward.
- g: [train] compile = true with LoRA dropout 0.1: compiled graphs per decoder-block shape over steps of
  changing batch shapes (target: at most 2), and the compiled first step's loss against an eager copy's.
Each pair runs alternately, the median of the repeats is reported.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.table import Table

import lorafit.lora.linear as lora_linear
from lorafit.lora.dropout import apply_keyed, dropout_keys, keep_mask, keyed_dropout, layer_keys
from lorafit.lora.linear import LoRALinear
from lorafit.model.loss import HeadCrossEntropy

P = 0.05  # lorafit's default LoRA dropout
DROPOUT_TARGET = 1.3


def shapes(device: torch.device, quick: bool) -> dict:
    """tokens, width and vocabulary: GPT-2 small's job a/b sizes on a CPU, the 1B Llama job's on a GPU."""
    if quick:
        return {"tokens": 512, "width": 64, "vocab": 1024}
    if device.type == "cuda":
        return {"tokens": 4 * 2048, "width": 2048, "vocab": 128256}
    return {"tokens": 4 * 512, "width": 768, "vocab": 50257}


def timed(device: torch.device, work: Callable[[], None]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def alternate(device: torch.device, works: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each work, run in turn `repeats` times after one warm-up round."""
    seconds = {name: [] for name in works}
    for round_ in range(repeats + 1):
        for name, work in works.items():
            elapsed = timed(device, work)
            if round_:
                seconds[name].append(elapsed)
    return seconds


def saved_bytes(run: Callable[[], torch.Tensor], exclude: set[int]) -> int:
    """Bytes of the tensors autograd keeps for backward while `run()` builds its graph, `exclude`d ids aside."""
    saved = {}

    def pack(tensor):
        if id(tensor) not in exclude and id(tensor._base) not in exclude:
            saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(saved.values())


def result(key: str, title: str, machine: dict, methods: dict, numerics: dict, ratios: list, notes: list,
           started: float, **job) -> dict:
    return {"job": {"key": key, "title": title, **job}, "machine": machine, "settings": {}, "methods": methods,
            "numerics": numerics, "ratios": ratios, "notes": notes, "wall_s": time.perf_counter() - started}


def ratio(key: str, name: str, value: float, target: float | None) -> dict:
    return {"key": key, "name": name, "value": value, "target": f"<= {target}" if target else None,
            "pass": value <= target if target else None}


# --------------------------------------------------------------------------- d: keyed dropout


def run_dropout(args, console, machine) -> dict:
    started, device = time.perf_counter(), torch.device(args.device)
    size = shapes(device, args.quick)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(size["tokens"], size["width"], device=device, dtype=dtype, requires_grad=True)
    upstream = torch.randn_like(x)
    keys = layer_keys(dropout_keys(0, 0, range(size["tokens"]), 1), 1)[0, :, 0].to(device)

    def step(dropout: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        return lambda: dropout(x).backward(upstream)

    seconds = alternate(device, {"keyed": step(lambda t: apply_keyed(t, keys, P)),
                                 "torch": step(lambda t: F.dropout(t, P, training=True))}, 10 * args.steps)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    kept = keep_mask(keys, size["width"], P).float().mean().item()
    with torch.no_grad():  # on a GPU the fused kernel must draw the eager ops' masks
        same = torch.equal(apply_keyed(x, keys, P) != 0, (keep_mask(keys, size["width"], P) & (x != 0)))
    value = median["keyed"] / median["torch"]
    console.print(f"job d: keyed {median['keyed'] * 1e3:.2f} ms, torch {median['torch'] * 1e3:.2f} ms, "
                  f"ratio {value:.2f}", highlight=False)
    methods = {name: {"label": f"{name} dropout p={P}, forward + backward", "median_ms": median[name] * 1e3,
                      "fastest_ms": min(seconds[name]) * 1e3} for name in median}
    numerics = {"check": "keyed dropout keep rate vs 1 - p (and the kernel draws the hash's mask)",
                "max_relative_difference": abs(kept - (1 - P)) / (1 - P), "tolerance": 1e-2,
                "agree": abs(kept - (1 - P)) / (1 - P) <= 1e-2 and same}
    notes = [f"Job d: dropout of a [{size['tokens']}, {size['width']}] {str(dtype).removeprefix('torch.')} activation, "
             "forward and backward, keyed (lorafit) and torch's F.dropout in turn; median of the repeats."]
    return result("d", "keyed LoRA dropout vs torch's dropout", machine(device), methods, numerics,
                  [ratio("dropout_time", "time keyed / torch dropout", value, DROPOUT_TARGET)], notes, started,
                  shape=[size["tokens"], size["width"]])


# --------------------------------------------------------------------------- f: fused projection, fused head


def run_fused(args, console, machine, monkeypatch_fused: Callable[[bool], None]) -> dict:
    started, device = time.perf_counter(), torch.device(args.device)
    size = shapes(device, args.quick)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens, width, vocab = size["tokens"], size["width"], size["vocab"]
    torch.manual_seed(0)
    base = torch.nn.Linear(width, width, bias=False).to(device, dtype).requires_grad_(False)
    layer = LoRALinear(base, rank=8, alpha=16, dropout=P).to(device).train()
    torch.nn.init.normal_(layer.lora_B, std=0.02)
    x = torch.randn(1, tokens, width, device=device, dtype=dtype, requires_grad=True)
    upstream = torch.randn(1, tokens, width, device=device, dtype=dtype)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def projection(fused_on: bool) -> Callable[[], torch.Tensor]:
        def forward() -> torch.Tensor:
            monkeypatch_fused(fused_on)
            with keyed_dropout([layer], 0, 0, [0], (1, tokens)), autocast:
                return layer(x)
        return forward

    def head_loss(chunked: bool) -> Callable[[], torch.Tensor]:
        def forward() -> torch.Tensor:
            if chunked:
                return HeadCrossEntropy.apply(hidden, head_weight, None, targets)
            return F.cross_entropy(F.linear(hidden, head_weight).float(), targets, reduction="sum")
        return forward

    hidden = torch.randn(tokens, width, device=device, dtype=dtype, requires_grad=True)
    head_weight = torch.randn(vocab, width, device=device, dtype=dtype) * width**-0.5
    targets = torch.randint(0, vocab, (tokens,), device=device)
    forwards = {"plain projection": projection(False), "fused projection": projection(True),
                "full-logits head": head_loss(False), "chunked head": head_loss(True)}
    outputs = {}
    for name, forward in forwards.items():
        out = forward()
        grad = torch.ones_like(out) if out.dim() == 0 else upstream
        out.backward(grad)
        source = x if "projection" in name else hidden
        outputs[name] = (out.detach().float(), source.grad.detach().float())
        x.grad = hidden.grad = None
    exclude = {id(x), id(hidden), id(head_weight), *(id(p) for p in layer.parameters())}
    kept = {name: saved_bytes(forward, exclude) for name, forward in forwards.items()}
    works = {name: (lambda f=forward, up=("projection" in name): f().backward(upstream if up else None))
             for name, forward in forwards.items()}
    median = {name: statistics.median(values) for name, values in alternate(device, works, 3 * args.steps).items()}
    monkeypatch_fused(True)
    differences = [((outputs[a][i] - outputs[b][i]).norm() / outputs[b][i].norm()).item()
                   for a, b in (("fused projection", "plain projection"), ("chunked head", "full-logits head"))
                   for i in (0, 1)]
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    methods = {name: {"label": name, "median_ms": median[name] * 1e3, "saved_bytes": kept[name]} for name in forwards}
    console.print("job f: " + ", ".join(f"{n} {m['median_ms']:.1f} ms / {m['saved_bytes'] / 2**20:.1f} MiB kept"
                                        for n, m in methods.items()), highlight=False)
    ratios = [
        ratio("fused_projection_time", "time fused / plain LoRA projection", median["fused projection"] /
              median["plain projection"], None),
        ratio("fused_projection_memory", "kept for backward, fused / plain LoRA projection",
              kept["fused projection"] / kept["plain projection"], 0.75),
        ratio("chunked_head_time", "time chunked / full-logits head cross-entropy", median["chunked head"] /
              median["full-logits head"], None),
        ratio("chunked_head_memory", "kept for backward, chunked / full-logits head",
              kept["chunked head"] / kept["full-logits head"], 0.5),
    ]
    numerics = {"check": "outputs and input gradients, fused vs plain (relative norm)",
                "max_relative_difference": max(differences), "tolerance": tolerance,
                "agree": max(differences) <= tolerance}
    notes = [f"Job f: a LoRA projection {width} -> {width} (rank 8, keyed dropout {P}) on {tokens} tokens, fused "
             f"(lorafit.lora.fused) and plain autograd; a {vocab}-word head on {tokens} hidden states, chunked with its "
             "gradient taken in the forward (HeadCrossEntropy) and as full logits + F.cross_entropy. 'Kept' counts "
             "the tensors autograd saves for backward, the inputs and weights aside."]
    return result("f", "fused LoRA projection and chunked head vs plain autograd", machine(device), methods, numerics,
                  ratios, notes, started, tokens=tokens, width=width, vocab=vocab)


# --------------------------------------------------------------------------- g: compiled graphs


BATCHES = [(4, 1.0), (4, 0.6), (2, 0.8), (3, 0.5)]  # (rows, share of max_length): new lengths and batch sizes
GRAPH_DROPOUT = 0.1


def run_graphs(args, console, machine, *, model_config, base_model, build_lorafit, make_accelerator) -> dict:
    from torch._dynamo.utils import counters

    from lorafit.model.load import decoder_blocks

    started, device = time.perf_counter(), torch.device(args.device)
    config = model_config(args.quick)
    length = 128
    batches = [[{"input_ids": ids, "labels": ids}
                for ids in (torch.randint(0, config.vocab_size, (round(length * share),)).tolist() for _ in range(rows))]
               for rows, share in BATCHES]
    base = base_model(config, device)
    accelerator = make_accelerator(device)
    eager = build_lorafit(copy.deepcopy(base), device, accelerator, False, dropout=GRAPH_DROPOUT)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    compiled = build_lorafit(base, device, accelerator, True, dropout=GRAPH_DROPOUT)
    losses = []
    for index, batch in enumerate(batches):
        loss, _ = compiled.step(batch)
        losses.append(loss)
        console.print(f"  job g: compiled step {index + 1}: {len(batch)} rows × {len(batch[0]['input_ids'])} tokens, "
                      f"{counters['stats']['unique_graphs'] - before} graphs so far", highlight=False)
    graphs = counters["stats"]["unique_graphs"] - before
    block_shapes = len({tuple((n, tuple(p.shape)) for n, p in block.named_parameters())
                        for block in decoder_blocks(compiled.model)})
    reference, _ = eager.step(batches[0])
    difference = abs(losses[0] - reference) / abs(reference)
    tolerance = 1e-2 if device.type == "cuda" else 1e-4
    methods = {"compiled": {"label": f"lorafit, compile = true, keyed LoRA dropout {GRAPH_DROPOUT}", "graphs": graphs,
                            "block_shapes": block_shapes, "steps": len(batches)}}
    numerics = {"check": "first-step loss, compiled vs eager", "max_relative_difference": difference,
                "tolerance": tolerance, "agree": difference <= tolerance}
    notes = [f"Job g: {len(batches)} training steps of {[len(b) for b in batches]} rows of changing lengths on the "
             f"bench's GPT-2 with lorafit's compile = true and LoRA dropout {GRAPH_DROPOUT}; graphs counted by "
             "torch._dynamo (unique_graphs). The first block gets its own graph: its input needs no gradient."]
    return result("g", "compiled blocks: graphs per block shape", machine(device), methods, numerics,
                  [ratio("graphs_per_block_shape", "compiled graphs per block shape", graphs / block_shapes, 2)],
                  notes, started)


def kernels_table(result_: dict) -> Table:
    table = Table(title=f"job {result_['job']['key']}: {result_['job']['title']}")
    columns = [key for key in ("median_ms", "fastest_ms", "saved_bytes", "graphs", "block_shapes", "steps")
               if any(key in m for m in result_["methods"].values())]
    table.add_column("method")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right")
    for m in result_["methods"].values():
        table.add_row(m["label"], *(format_cell(column, m.get(column)) for column in columns))
    return table


def format_cell(column: str, value) -> str:
    if value is None:
        return ""
    if column == "saved_bytes":
        return f"{value / 2**20:,.1f} MiB"
    return f"{value:,.2f}" if isinstance(value, float) else str(value)


def kernels_markdown(result_: dict) -> list[str]:
    job = result_["job"]
    columns = [key for key in ("median_ms", "fastest_ms", "saved_bytes", "graphs")
               if any(key in m for m in result_["methods"].values())]
    lines = [f"Job {job['key']}: {job['title']}.", "", "| method | " + " | ".join(c.replace("_", " ") for c in columns)
             + " |", "|---|" + "---:|" * len(columns)]
    for m in result_["methods"].values():
        lines.append(f"| {m['label']} | " + " | ".join(format_cell(c, m.get(c)) for c in columns) + " |")
    lines += ["", "| ratio | measured | target |", "|---|---:|---|"]
    for r in result_["ratios"]:
        verdict = "" if r["pass"] is None else (" (PASS)" if r["pass"] else " (MISS)")
        lines.append(f"| {r['name']} | {r['value']:.2f} | {r['target'] or '—'}{verdict} |")
    numerics = result_["numerics"]
    lines += [f"| {numerics['check']} | {numerics['max_relative_difference']:.1e} | <= {numerics['tolerance']:.0e} "
              f"({'PASS' if numerics['agree'] else 'FAIL'}) |", ""]
    return lines


def fused_switch(on: bool) -> None:
    """Let LoRALinear take the fused path where it applies (on), or always the plain one."""
    from lorafit.lora.fused import fused_applies

    lora_linear.fused_applies = fused_applies if on else (lambda layer, x: False)
