"""`[data] packing`: rows laid end to end in max_length sequences are each computed as if alone."""

from __future__ import annotations

import io
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MOE, TINY_MODEL, randomize, supervised_rows, tiny_config, tiny_model, write_jsonl
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.data.batches import collate, supervised_count
from lorafit.data.packing import PACKED_MODEL_TYPES, best_fit, check_packing, pack
from lorafit.data.tasks import IGNORE
from lorafit.errors import LorafitError
from lorafit.model.inject import inject_lora
from lorafit.model.loss import loss_sum
from lorafit.recipe import load_recipe
from lorafit.train.loop import train


def pack_rows(rows: list[dict], supervised: list[int], max_length: int) -> SimpleNamespace:
    """lorafit's packing of in-memory rows: the sequences (as lists), each one's row indices and supervised tokens."""
    packed = pack([len(row["input_ids"]) for row in rows], supervised, max_length)
    sequences = packed.sequences(range(len(packed)), lambda indices: [rows[i] for i in indices])
    as_lists = [{key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in sequence.items()}
                for sequence in sequences]
    return SimpleNamespace(sequences=as_lists, members=[packed.members_of(i).tolist() for i in range(len(packed))],
                           supervised=packed.supervised.tolist())


def bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """best_fit's bins as lists of row indices."""
    members, bounds = best_fit(lengths, capacity)
    return [members[start:stop].tolist() for start, stop in zip(bounds[:-1], bounds[1:])]


def mixed_rows() -> list[dict]:
    """Completion-like rows (prompt unsupervised) and text-like rows (every label set, the first one too)."""
    text = [{"input_ids": list(range(2 + i, 12 + 3 * i)), "labels": list(range(2 + i, 12 + 3 * i))} for i in range(3)]
    return supervised_rows() + text


def alone(model: torch.nn.Module, row: dict) -> torch.Tensor:
    """The row's summed cross-entropy, run through the model on its own with plain logits."""
    logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
    return F.cross_entropy(logits, torch.tensor(row["labels"][1:]), ignore_index=IGNORE, reduction="sum")


def lora_model(arch: str) -> torch.nn.Module:
    """q and v, and the experts of a mixture-of-experts model (routed token by token, so packing must not matter)."""
    model = tiny_model(arch)
    randomize(inject_lora(model, ["q", "v", "experts"] if arch in MOE else ["q", "v"], rank=2, alpha=4, dropout=0.0))
    return model


@pytest.mark.parametrize("arch", sorted(PACKED_MODEL_TYPES))
def test_packed_rows_get_the_losses_they_get_alone(arch):
    model, rows = lora_model(arch), mixed_rows()
    packed = pack_rows(rows, [supervised_count(torch.tensor([row["labels"]])) for row in rows], max_length=40)
    assert len(packed.sequences) < len(rows)  # rows really share sequences
    batch = collate(packed.sequences, pad_id=1)
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        placed = {}  # row -> its logits cut out of the packed batch
        for i, (sequence, members) in enumerate(zip(packed.sequences, packed.members)):
            starts = torch.tensor([0, *sequence["row_lengths"]]).cumsum(0).tolist()
            for index, start, stop in zip(members, starts, starts[1:]):
                assert sequence["input_ids"][start:stop] == rows[index]["input_ids"]
                placed[index] = logits[i, start : stop - 1]
        assert sorted(placed) == list(range(len(rows)))
        for index, row in enumerate(rows):
            packed_loss = F.cross_entropy(placed[index], torch.tensor(row["labels"][1:]), ignore_index=IGNORE,
                                          reduction="sum")
            torch.testing.assert_close(packed_loss, alone(model, row), rtol=1e-5, atol=1e-5)


def test_packed_batch_trains_like_the_unpacked_rows():
    """Same summed loss, same supervised-token count, same LoRA gradients as the rows padded one per batch row."""
    rows = mixed_rows()
    counts = [supervised_count(torch.tensor([row["labels"]])) for row in rows]
    packed = pack_rows(rows, counts, max_length=40)
    assert sum(packed.supervised) == sum(counts) == supervised_count(collate(packed.sequences, 1)["labels"])
    results = []
    for batch in (collate(rows, pad_id=1), collate(packed.sequences, pad_id=1)):
        model = lora_model("gpt2")
        summed, count = loss_sum(model, batch)
        summed.backward()
        results.append((summed, count, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (padded, padded_count, padded_grads), (packed_sum, packed_count, packed_grads) = results
    expected = sum(alone(lora_model("gpt2"), row) for row in rows)
    torch.testing.assert_close(packed_sum, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(padded, expected, rtol=1e-5, atol=1e-4)
    assert packed_count == padded_count == sum(counts)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_position_ids_restart_at_each_packed_row_and_at_the_padding():
    sequences = [{"input_ids": [5] * 7, "labels": [IGNORE] * 7, "row_lengths": [3, 4]},
                 {"input_ids": [6] * 4, "labels": [IGNORE] * 4, "row_lengths": [2, 2]}]
    batch = collate(sequences, pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 0, 1, 2]]


@pytest.mark.parametrize("arch", ["bloom", "opt"])
def test_model_types_whose_attention_would_mix_packed_rows_are_refused(arch):
    """They really do mix them (so the refusal is needed), and check_packing says so in one line."""
    model, row = tiny_model(arch), supervised_rows()[0]
    other = {"input_ids": list(range(2, 9)), "labels": list(range(2, 9))}
    packed = pack_rows([row, other], [1, 6], max_length=64)
    assert packed.members == [[1, 0]]  # the longer row first: the causal mask alone keeps it from seeing `row`
    batch = collate(packed.sequences, pad_id=1)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        mixed = logits[0, len(other["input_ids"]) :]
        assert not torch.allclose(mixed, model(input_ids=torch.tensor([row["input_ids"]])).logits[0], atol=1e-4)
    with pytest.raises(LorafitError, match=f"packing is not supported for {arch} models"):
        check_packing(tiny_config(arch))


def test_best_fit_packs_every_row_once_within_capacity_and_deterministically():
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    packed = bins(lengths, 64)
    assert sorted(i for members in packed for i in members) == list(range(500))
    assert all(sum(lengths[i] for i in members) <= 64 for members in packed)
    assert len(packed) <= 1.05 * sum(lengths) / 64 + 1  # near the bound no packing can beat
    assert packed == bins(lengths, 64)
    assert bins([3, 5, 2, 4], 7) == [[1, 2], [3, 0]]  # 5 + 2, then 4 + 3



def test_packing_that_puts_no_two_rows_together_says_why_and_what_would_help():
    lengths = [40, 33, 35, 31]
    packed = pack(lengths, [1] * len(lengths), max_length=60)
    assert len(packed) == len(lengths)  # 31 + 33 > 60: every row alone
    two_shortest, median = sorted(lengths)[0] + sorted(lengths)[1], sorted(lengths)[len(lengths) // 2]
    text = packed.describe()
    assert f"no two rows fit in one sequence (the two shortest hold {two_shortest} tokens together" in text
    assert f"raise [data] max_length (to {2 * median} for about two rows a sequence)" in text
    assert "set packing = false" in text and packed.summary()["note"] in text
    packs = pack(lengths, [1] * len(lengths), max_length=2 * median)
    assert len(packs) < len(lengths)
    assert "no two rows" not in packs.describe() and "note" not in packs.summary()


def completion_recipe(tmp_path, **train):
    """A completion job with mixed lengths (prompts of 1-12 words, responses of 1-20) on the tiny model."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    words = ["good", "bad", "film", "plot", "the", "a", "was", "great", "dull", "story"]
    rows = [{"prompt": " ".join(rng.choices(words, k=rng.randint(1, 12))),
             "response": " " + " ".join(rng.choices(words, k=rng.randint(1, 20)))} for _ in range(48)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = {"model": {"name": str(TINY_MODEL)}, "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
              "data": {"source": {"train": str(data), "validation": str(data)}, "task": "completion",
                       "template": "Q: {text}\nA:", "max_length": 64, "max_eval_examples": 8, "packing": True},
              "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "log_every": 2, "seed": 3, **train},
              "output": {"dir": str(tmp_path / "run")}}
    import tomli_w

    path = tmp_path / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    return path


def test_packed_run_is_the_same_adapter_with_accumulation_and_reports_its_packing(tmp_path):
    one = completion_recipe(tmp_path / "one")
    accumulated = completion_recipe(tmp_path / "acc", batch_size=2, grad_accum=2)
    console = io.StringIO()
    report = train(load_recipe(one), console=Console(file=console, width=200))
    train(load_recipe(accumulated), console=Console(file=io.StringIO()))
    assert "packing 48 rows into" in console.getvalue()
    assert report["packing"]["rows"] == 48 and report["packing"]["sequences"] < 48
    left, right = (load_file(str(p / "run" / "adapter" / "adapter_model.safetensors")) for p in (tmp_path / "one",
                                                                                              tmp_path / "acc"))
    assert max((left[k] - right[k]).abs().max().item() for k in left) < 1e-6
    metrics = [json.loads(line) for line in (tmp_path / "one" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["loss"] > 0 for m in metrics)


def test_packing_on_a_model_that_would_mix_rows_is_one_line_exit_2(tmp_path):
    model = tmp_path / "bloom"
    tiny_model("bloom").save_pretrained(model)
    result = CliRunner().invoke(app, ["train", "-r", str(completion_recipe(tmp_path)), "--set",
                                      f"model.name={json.dumps(str(model))}"])
    assert result.exit_code == 2 and "packing is not supported for bloom models" in result.stderr
    assert not (tmp_path / "run").exists()
