"""Precision that fits the device: bf16 on a CUDA GPU with bf16, fp32 on CPU, and no needless casts."""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import pytest
import torch
from conftest import assert_one_line_error, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

import lorafit.evaluate as evaluate_module
from lorafit.cli import app
from lorafit.data.tasks import IGNORE
from lorafit.data.tokenize import TokenizedSplit
from lorafit.errors import LorafitError
from lorafit.evaluate import evaluate_split
from lorafit.lora.linear import LoRALinear
from lorafit.model.inject import inject_lora
from lorafit.model.load import resolve_precision
from lorafit.model.loss import SupervisedLoss
from lorafit.recipe import DataSection
from lorafit.recipe_file import validate


@pytest.mark.parametrize(
    ("dtype", "mixed", "cuda_bf16", "expected"),
    [
        ("auto", "auto", True, ("bfloat16", "bf16")),
        ("auto", "auto", False, ("float32", "no")),
        ("float32", "auto", True, ("float32", "bf16")),
        ("auto", "no", True, ("bfloat16", "no")),
        ("bfloat16", "auto", False, ("bfloat16", "no")),
        ("float32", "bf16", False, ("float32", "bf16")),
        ("float16", "fp16", True, ("float16", "fp16")),
    ],
)
def test_precision_resolves_per_device(dtype, mixed, cuda_bf16, expected):
    assert resolve_precision(dtype, mixed, cuda_bf16=cuda_bf16) == expected


@pytest.mark.parametrize("mixed", ["auto", "no", "bf16"])
def test_fp16_weights_without_loss_scaling_are_refused(mixed):
    with pytest.raises(LorafitError, match="mixed_precision = 'fp16'"):
        validate({"model": {"dtype": "float16"}, "train": {"mixed_precision": mixed}})


def test_fp16_weights_without_loss_scaling_are_one_line_exit_2_with_nothing_written(tiny_recipe, tmp_path):
    path = tiny_recipe(model={"dtype": "float16"})
    result = CliRunner().invoke(app, ["train", "-r", str(path)])
    assert "mixed_precision = 'fp16'" in assert_one_line_error(result)
    assert not (tmp_path / "run").exists()


class Outputs(TorchDispatchMode):
    """Records the dtype and size of every tensor an aten op makes."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made += [(t.dtype, t.numel()) for t in (out if isinstance(out, (tuple, list)) else [out])
                      if isinstance(t, torch.Tensor)]
        return out


def test_lora_under_bf16_autocast_makes_no_fp32_copy_of_its_input():
    base = torch.nn.Linear(32, 48).to(torch.bfloat16)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.1).train()
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    with Outputs() as outputs, torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert (torch.bfloat16, x.numel()) in outputs.made  # the dropped-out input, in bf16
    assert (torch.float32, x.numel()) not in outputs.made
    out.float().sum().backward()
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32  # fp32 master weights
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32


def test_lora_without_autocast_still_runs_a_bf16_base_with_fp32_weights():
    base = torch.nn.Linear(32, 48).to(torch.bfloat16)
    layer = LoRALinear(base, rank=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    expected = base(x).float() + layer.scaling * (x.float() @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2)


def test_evaluation_under_bf16_autocast_scores_like_fp32(monkeypatch):
    model = tiny_model("gpt2")
    inject_lora(model, ["q", "v"], rank=2, alpha=4)
    generator = torch.Generator().manual_seed(0)
    label_words = [[40], [41]]  # the token ids of two label words
    rows = []
    for i in range(12):
        prompt = torch.randint(2, 128, (6 + i % 5,), generator=generator).tolist()
        word = label_words[i % 2]
        rows.append({"input_ids": prompt + word, "labels": [IGNORE] * len(prompt) + word,
                     "prompt_len": len(prompt), "label_index": i % 2})
    split = TokenizedSplit(datasets.Dataset.from_list(rows), dropped=0, total=len(rows))
    data = DataSection(source="x.jsonl", task="classification", labels=["a", "b"])
    monkeypatch.setattr(evaluate_module, "label_token_ids", lambda data, tokenizer: label_words)
    tokenizer = SimpleNamespace(pad_token_id=1)
    scorer = SupervisedLoss(model)
    fp32 = evaluate_split(scorer, split, data, tokenizer, batch_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = evaluate_split(scorer, split, data, tokenizer, batch_size=4)
    assert bf16["accuracy"] == fp32["accuracy"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2)
    assert bf16["loss"] != fp32["loss"]  # it did run in bf16
