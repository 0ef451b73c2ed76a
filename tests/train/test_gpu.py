"""On a CUDA GPU: bf16 by default, no host waits inside the step, CUDA memory and MFU in the report.

Every test here is marked `gpu` and skipped without CUDA; `make gpu-check` runs them on a GPU machine.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import tiny_model, write_recipe
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.data.batches import collate
from lorafit.lora.linear import LoRALinear
from lorafit.model.load import resolve_precision
from lorafit.model.loss import SupervisedLoss
from lorafit.recipe import LoraSection, TrainSection
from lorafit.report.throughput import peak_for_name
from lorafit.train.optimizer import build_optimizer
from lorafit.train.processes import make_accelerator
from lorafit.train.step import prepare_model, train_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)"),
]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double().cpu(), reference.double().cpu()
    return float((value - reference).norm() / reference.norm())


def test_auto_precision_on_this_gpu_is_bf16_weights_under_bf16_autocast():
    expected = ("bfloat16", "bf16") if torch.cuda.is_bf16_supported() else ("float32", "no")
    assert resolve_precision("auto", "auto") == expected


def test_lora_layer_on_a_bf16_base_under_autocast_matches_float64_dense_math():
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 384).to("cuda", torch.bfloat16)
    layer = LoRALinear(base, rank=8, alpha=16).cuda()
    torch.nn.init.normal_(layer.lora_B, std=0.05)
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
    upstream = torch.randn_like(out)
    out.backward(upstream)

    # The same function in float64 on the CPU: W0 x + b + (alpha / r) B A x.
    w0, bias = base.weight.double().cpu(), base.bias.double().cpu()
    a = layer.lora_A.detach().double().cpu().requires_grad_()
    b = layer.lora_B.detach().double().cpu().requires_grad_()
    x64 = x.detach().double().cpu()
    expected = x64 @ w0.T + bias + layer.scaling * (x64 @ a.T @ b.T)
    expected.backward(upstream.double().cpu())

    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32  # fp32 master weights
    assert relative_error(out, expected) < 1e-2  # bf16 operands: 1e-3 .. 1e-2
    assert relative_error(layer.lora_A.grad, a.grad) < 2e-2
    assert relative_error(layer.lora_B.grad, b.grad) < 2e-2


def test_the_fused_keyed_dropout_kernel_draws_the_masks_of_the_eager_hash():
    from lorafit.lora.dropout import apply_keyed, dropout_keys, dropped, keep_mask, layer_keys

    keys = layer_keys(dropout_keys(3, 1, list(range(4)), 300), 2)[1].cuda()
    x = torch.randn(4, 300, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fused = apply_keyed(x, keys, 0.1)
    torch.testing.assert_close(fused, dropped(x, keys, 0.1), rtol=0, atol=0)
    assert torch.equal(fused != 0, keep_mask(keys, 512, 0.1) & (x != 0))
    assert torch.equal(keep_mask(keys, 512, 0.1).cpu(), keep_mask(keys.cpu(), 512, 0.1))  # CUDA's int32 wraps as the CPU's
    fused.backward(torch.ones_like(fused))
    torch.testing.assert_close(x.grad, (fused != 0).to(x.dtype) / 0.9, rtol=0, atol=0)


def test_fused_lora_projection_under_bf16_autocast_matches_the_plain_path():
    from lorafit.lora import linear
    from lorafit.lora.dropout import keyed_dropout

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(256, 384).to("cuda", torch.bfloat16).requires_grad_(False), rank=8, alpha=16,
                       dropout=0.1).cuda().train()
    torch.nn.init.normal_(layer.lora_B, std=0.05)
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    upstream = torch.randn(4, 64, 384, device="cuda", dtype=torch.bfloat16)
    results = []
    for fused_on in (True, False):
        original = linear.fused_applies
        linear.fused_applies = original if fused_on else (lambda *args: False)
        try:
            x_ = x.clone().requires_grad_()
            with keyed_dropout([layer], 0, 0, [0, 1, 2, 3], (4, 64)), torch.autocast("cuda", dtype=torch.bfloat16):
                out = layer(x_)
            out.backward(upstream)
            results.append([out, x_.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()])
            layer.zero_grad()
        finally:
            linear.fused_applies = original
    for fused_value, plain_value in zip(*results):
        assert relative_error(fused_value, plain_value) < 1e-2  # bf16 rounding, summed in another order


def test_qlora_weights_are_quantized_on_the_gpu():
    pytest.importorskip("torchao")
    from lorafit.model.quantize import NF4Linear

    model = tiny_model("gpt2")  # on the CPU, as loaded
    prepare_model(model, LoraSection(rank=4, alpha=8, dropout=0.0, targets=["q", "v"]), quantize="nf4",
                  device=torch.device("cuda"))
    quantized = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert quantized and all(m.weight.device.type == "cuda" for m in quantized)


def synchronizing_calls(step) -> int:
    """How many times `step()` makes the host wait for the GPU (torch's sync debug mode warns on each)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def test_training_steps_wait_for_the_gpu_only_where_the_loss_is_read():
    model = tiny_model("gpt2").train()
    lora = LoraSection(rank=4, alpha=8, dropout=0.1, targets=["q", "v"])
    layers = prepare_model(model, lora)
    model.cuda()
    accelerator = make_accelerator("bf16")
    optimizer, scheduler = build_optimizer(model, TrainSection(lr=1e-3, seed=0), total_steps=10)
    scorer, optimizer = accelerator.prepare(SupervisedLoss(model), optimizer)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        ids = torch.randint(2, 128, (10 + i,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 5 + ids[5:]})
    # As the training loop hands it over: collated and counted on the CPU, in pinned memory.
    batch = {k: v.pin_memory() for k, v in collate(rows, pad_id=0).items()}
    batch["rows"] = list(range(len(rows)))

    def one_step(step: int) -> torch.Tensor:
        loss, _ = train_step(accelerator, scorer, optimizer, scheduler, [batch], step=step, max_grad_norm=1.0,
                             layers=layers.values())
        return loss

    one_step(0)  # the first step creates the AdamW state and warms up the kernels
    losses = []
    assert synchronizing_calls(lambda: losses.extend(one_step(step) for step in range(1, 4))) == 0
    assert synchronizing_calls(lambda: [loss.item() for loss in losses[-1:]]) == 1  # the log step's one read


def train_tiny(folder, *, steps: int = 60, model=None, mixed_precision: str = "auto") -> dict:
    """The shipped tiny model and data, trained for `steps` on the GPU; its report.json."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(folder, model=model or {}, data={"max_eval_examples": 200},
                          train={"max_steps": steps, "batch_size": 16, "lr": 3e-3, "log_every": 10,
                                 "mixed_precision": mixed_precision})
    result = CliRunner().invoke(app, ["train", "-r", str(recipe)])
    assert result.exit_code == 0, result.output
    return json.loads((folder / "run" / "report.json").read_text())


def test_the_shipped_recipe_trains_in_bf16_on_the_gpu_and_reports_cuda_memory_and_mfu(tmp_path):
    report = train_tiny(tmp_path)
    assert report["device"].startswith("cuda")
    if torch.cuda.is_bf16_supported():
        assert (report["dtype"], report["mixed_precision"]) == ("bfloat16", "bf16")
    memory = report["memory"]
    assert 0 < memory["peak_bytes"] <= memory["peak_reserved_bytes"]
    throughput = report["throughput"]
    peak, _ = peak_for_name(torch.cuda.get_device_name())
    assert (throughput["mfu"] is None) == (peak is None)
    if peak is not None:
        assert throughput["mfu"] == pytest.approx(throughput["achieved_tflops"] * 1e12 / peak)
        per_device = throughput["model_flops_per_token"] * throughput["tokens_per_s"] / report["world_size"]
        assert throughput["mfu"] == pytest.approx(per_device / peak)
    assert report["eval"]["loss"] < report["eval"]["before"]["loss"]


def test_bf16_evaluation_on_the_gpu_scores_like_float32(tmp_path):
    """Before any training the adapter is the base model: bf16 autocast and fp32 must agree on its scores."""
    bf16 = train_tiny(tmp_path / "bf16", steps=1)["eval"]["before"]
    fp32 = train_tiny(tmp_path / "fp32", steps=1, model={"dtype": "float32"}, mixed_precision="no")["eval"]["before"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2)
    assert abs(bf16["accuracy"] - fp32["accuracy"]) <= 0.02
