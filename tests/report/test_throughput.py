"""Model FLOPs per token checked against torch's own FLOP counter on a real LoRA training step; MFU and the peak table."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch.utils.flop_counter import FlopCounterMode

from lorafit.data.tasks import IGNORE
from lorafit.model.loss import SupervisedLoss
from lorafit.recipe import LoraSection
from lorafit.report.throughput import device_peak_flops, peak_for_name, throughput_figures, training_flops_per_token
from lorafit.train.step import prepare_model, train_step

ROWS, LENGTH, PROMPT = 3, 16, 10  # every row LENGTH tokens, the last LENGTH - PROMPT supervised


def counted_step(arch: str, targets: list[str]):
    """(the model, its LoRA layers, the FLOPs FlopCounterMode counts in one train_step on ROWS × LENGTH tokens).

    Set up so that the counter sees what the model FLOPs convention counts, no more and no less:
    - eager attention: the counter has no formula for the CPU's fused attention kernel. Both it and the
      convention count QKᵀ and AV over the whole LENGTH × LENGTH square, the causal mask's masked half
      included (PaLM's convention; FlopCounterMode's attention formula does not halve for a causal mask);
    - the embeddings' output requires grad, as under gradient checkpointing: the convention gives every frozen
      projection a gradient w.r.t. its input (4N), where a plain step skips it in the first block below the
      first adapted projection, since nothing there trains;
    - whole projections adapted: q/v slices of a fused projection run B as one block-structured matrix, zeros
      included, which is work done but not model FLOPs;
    - no padding and no gradient checkpointing (recomputation is not model FLOPs either).
    The head runs on the supervised positions only, in the step as in the formula.
    """
    from accelerate import Accelerator

    model = tiny_model(arch)
    model.set_attn_implementation("eager")
    layers = prepare_model(model, LoraSection(rank=4, alpha=8, dropout=0.1, targets=targets))
    model.enable_input_require_grads()
    model.train()
    ids = torch.randint(2, 128, (ROWS, LENGTH), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :PROMPT] = IGNORE
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator = Accelerator(cpu=True)
    scorer, optimizer = accelerator.prepare(SupervisedLoss(model), optimizer)
    with FlopCounterMode(display=False) as counter:
        train_step(accelerator, scorer, optimizer, scheduler, [{"input_ids": ids, "labels": labels}],
                   max_grad_norm=1.0, layers=layers.values())
    return model, layers, counter.get_total_flops()


@pytest.mark.parametrize(("arch", "targets"), [("gpt2", ["all-linear"]), ("llama", ["q", "v"])])
def test_model_flops_per_token_equal_torchs_count_of_a_lora_training_step(arch, targets):
    """GPT-2: Conv1D weights stored transposed, a tied head; Llama: grouped key/value heads (attention FLOPs
    are the query heads'), separate q and v projections."""
    model, layers, counted = counted_step(arch, targets)
    tokens = ROWS * LENGTH
    supervised = ROWS * (LENGTH - PROMPT) / tokens  # positions that predict a supervised token

    def formula(layers=layers, seq_len=LENGTH, supervised=supervised):
        return tokens * training_flops_per_token(model, layers, seq_len=seq_len, supervised_fraction=supervised)

    assert formula() == pytest.approx(counted, rel=1e-9)
    # the comparison sees each term: without the LoRA matmuls, attention or the head it would fail
    for dropped in (formula(layers={}), formula(seq_len=0), formula(supervised=0.0), formula(supervised=1.0)):
        assert dropped != pytest.approx(counted, rel=1e-9)


def test_mfu_is_none_on_cpu_but_the_achieved_flops_are_reported():
    peak = device_peak_flops(torch.device("cpu"))
    figures = throughput_figures(1e6, 2_000.0, peak)
    assert peak[0] is None and peak[1].startswith("no known peak for CPU") and "peak_tflops" in peak[1]
    assert figures["mfu"] is None and figures["peak_tflops"] is None
    assert figures["peak_source"] == peak[1]
    assert figures["model_flops_per_token"] == 1e6
    assert figures["achieved_tflops"] == pytest.approx(1e6 * 2_000.0 / 1e12)


def test_mfu_is_achieved_over_peak():
    figures = throughput_figures(3e9, 1e4, (100e12, "a made-up peak"))
    assert figures["achieved_tflops"] == pytest.approx(30.0)
    assert figures["mfu"] == pytest.approx(30e12 / 100e12)
    assert figures["peak_tflops"] == pytest.approx(100.0)
    assert figures["peak_source"] == "a made-up peak"


def test_mfu_is_per_device_so_processes_that_share_the_tokens_report_the_mfu_of_one():
    one = throughput_figures(3e9, 1e4, (100e12, "a made-up peak"))
    # two devices, each as fast as the one: twice the tokens/s of all processes, the same work per device
    two = throughput_figures(3e9, 2e4, (100e12, "a made-up peak"), processes=2)
    assert two["mfu"] == pytest.approx(one["mfu"]) and two["achieved_tflops"] == pytest.approx(one["achieved_tflops"])
    assert two["devices"] == 2


def test_a_given_peak_is_used_on_any_device():
    assert device_peak_flops(torch.device("cpu"), 50.0) == (50e12, "[train] peak_tflops = 50")


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 PCIe", 756.0),  # contains "H100" too: the specific entry wins
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40", 181.0),  # not the L4's: names match as whole words
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
    ],
)
def test_peak_lookup_picks_the_most_specific_name(name, tflops):
    peak, source = peak_for_name(name)
    assert peak == pytest.approx(tflops * 1e12)
    assert f"{tflops:g} TFLOP/s" in source


def test_unknown_device_has_no_peak():
    peak, source = peak_for_name("NVIDIA GeForce GTX 1080")
    assert peak is None and "GTX 1080" in source
