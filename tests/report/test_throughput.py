"""Model FLOPs per token and MFU: the formula checked against hand counts from tiny configs, and the peak table."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from lorafit.model.inject import inject_lora
from lorafit.report.throughput import device_peak_flops, peak_for_name, throughput_figures, training_flops_per_token

SEQ_LEN, SUPERVISED = 16, 0.25
RANK = 4


def flops_for(arch: str) -> float:
    model = tiny_model(arch)
    layers = inject_lora(model, ["q", "v"], rank=RANK, alpha=8)
    return training_flops_per_token(model, layers, seq_len=SEQ_LEN, supervised_fraction=SUPERVISED)


def hand_count(frozen: int, layers: int, heads: int, head_dim: int, hidden: int, vocab: int, lora: int) -> float:
    return (
        4 * frozen  # frozen trunk: forward 2N + activation gradients 2N
        + 12 * layers * heads * head_dim * SEQ_LEN  # QKᵀ and AV: forward 4·L·H·Q·T, backward twice that
        + 4 * hidden * vocab * SUPERVISED  # head forward + gradient w.r.t. hidden, supervised positions only
        + 6 * lora  # LoRA trains: forward, activation and weight gradients
    )


def test_gpt2_flops_per_token_match_a_hand_count():
    # GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128); MLP width 4·32 = 128.
    per_layer = (
        32 * 96  # c_attn: 32 -> q, k, v (3·32)
        + 32 * 32  # attn.c_proj
        + 32 * 128  # mlp.c_fc
        + 128 * 32  # mlp.c_proj
    )
    frozen = 2 * per_layer  # wte, wpe, layer norms and the (tied) lm_head are not trunk matmuls
    # q and v on the fused c_attn: a rank-4 pair each, A [4, 32] and B [32, 4] per slice.
    lora = 2 * 2 * (RANK * 32 + 32 * RANK)
    expected = hand_count(frozen, layers=2, heads=4, head_dim=8, hidden=32, vocab=128, lora=lora)
    assert flops_for("gpt2") == pytest.approx(expected)


def test_llama_flops_per_token_match_a_hand_count():
    # hidden 32, intermediate 64, 2 layers, 4 query heads and 2 key/value heads of head_dim 32/4 = 8.
    per_layer = (
        32 * 32  # q_proj
        + 32 * 16  # k_proj: 2 kv heads · 8
        + 32 * 16  # v_proj
        + 32 * 32  # o_proj
        + 3 * 32 * 64  # gate_proj, up_proj, down_proj
    )
    frozen = 2 * per_layer
    # q: A [4, 32] + B [32, 4]; v: A [4, 32] + B [16, 4].
    lora = 2 * ((RANK * 32 + 32 * RANK) + (RANK * 32 + 16 * RANK))
    # Attention FLOPs use the query heads: grouped key/value heads do not shrink QKᵀ or AV.
    expected = hand_count(frozen, layers=2, heads=4, head_dim=8, hidden=32, vocab=128, lora=lora)
    assert flops_for("llama") == pytest.approx(expected)


def test_mfu_is_none_on_cpu_but_the_achieved_flops_are_reported():
    peak = device_peak_flops(torch.device("cpu"))
    figures = throughput_figures(1e6, 2_000.0, peak)
    assert peak == (None, "no known peak for CPU")
    assert figures["mfu"] is None and figures["peak_tflops"] is None
    assert figures["peak_source"] == "no known peak for CPU"
    assert figures["model_flops_per_token"] == 1e6
    assert figures["achieved_tflops"] == pytest.approx(1e6 * 2_000.0 / 1e12)


def test_mfu_is_achieved_over_peak():
    figures = throughput_figures(3e9, 1e4, (100e12, "a made-up peak"))
    assert figures["achieved_tflops"] == pytest.approx(30.0)
    assert figures["mfu"] == pytest.approx(30e12 / 100e12)
    assert figures["peak_tflops"] == pytest.approx(100.0)
    assert figures["peak_source"] == "a made-up peak"


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 PCIe", 756.0),  # contains "H100" too: the specific entry wins
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
    ],
)
def test_peak_lookup_picks_the_most_specific_name(name, tflops):
    peak, source = peak_for_name(name)
    assert peak == pytest.approx(tflops * 1e12)
    assert f"{tflops:g} TFLOP/s" in source


def test_unknown_device_has_no_peak():
    peak, source = peak_for_name("NVIDIA GeForce GTX 1080")
    assert peak is None and "GTX 1080" in source
