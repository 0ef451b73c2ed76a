"""LoRA on a weight parameter (lorafit.lora.experts) on its own: a toy module that indexes a stacked expert weight
the way MoE layers do, against W_e + scaling · B_e·A_e computed expert by expert."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafit.lora.experts import ExpertLoRA

EXPERTS, D_IN, D_OUT, RANK, ALPHA = 3, 5, 7, 2, 6.0


class Stack(nn.Module):
    """Routes token i to expert i % experts and applies that expert's weight ([E, d_out, d_in], or transposed)."""

    def __init__(self, transposed: bool = False):
        super().__init__()
        self.transposed = transposed
        shape = (EXPERTS, D_IN, D_OUT) if transposed else (EXPERTS, D_OUT, D_IN)
        self.up = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)), requires_grad=False)
        self.down = nn.Parameter(torch.randn(EXPERTS, D_IN, D_OUT, generator=torch.Generator().manual_seed(1)),
                                 requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        experts = torch.arange(x.shape[0]) % EXPERTS
        weight = self.up[experts]
        hidden = torch.einsum("ni,nio->no" if self.transposed else "ni,noi->no", x, weight)
        return torch.einsum("no,nio->ni", hidden, self.down[experts])


def randomized(layer: ExpertLoRA) -> ExpertLoRA:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))
    return layer


def dense(layer: ExpertLoRA) -> torch.Tensor:
    """W_e + (alpha/r)·B_e·A_e for each expert, in the parameter's layout, one expert at a time."""
    weights = []
    for e in range(EXPERTS):
        delta = (ALPHA / RANK) * layer.lora_B[e] @ layer.lora_A[e]  # [d_out, d_in]
        weights.append(layer.weight[e] + (delta.t() if layer.transposed else delta))
    return torch.stack(weights)


def tokens() -> torch.Tensor:
    return torch.randn(8, D_IN, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("transposed", [False, True], ids=["experts-out-in", "experts-in-out"])
def test_expert_lora_output_is_the_dense_per_expert_update(transposed):
    stack = Stack(transposed)
    layer = randomized(ExpertLoRA(stack, RANK, ALPHA, parameter="up", transposed=transposed))
    assert layer.weight_shape == (D_OUT, D_IN) and layer.experts == EXPERTS
    reference = Stack(transposed)
    with torch.no_grad():
        reference.up.copy_(dense(layer))
    torch.testing.assert_close(layer(tokens()), reference(tokens()), rtol=1e-5, atol=1e-5)


def test_b_zero_leaves_the_output_and_the_weight_alone():
    stack = Stack()
    before, weight = stack(tokens()), stack.up.clone()
    layer = ExpertLoRA(stack, RANK, ALPHA, parameter="up")
    assert not layer.lora_B.any() and layer.lora_A.abs().sum() > 0
    assert torch.equal(layer(tokens()), before)
    assert torch.equal(stack.up, weight) and isinstance(stack.up, nn.Parameter)  # swapped back after the forward


def test_two_parameters_of_one_module_nest_and_each_adds_its_own_update():
    stack = Stack()
    inner = randomized(ExpertLoRA(stack, RANK, ALPHA, parameter="up"))
    outer = randomized(ExpertLoRA(inner, RANK, ALPHA, parameter="down"))  # [E, d_out = D_IN, d_in = D_OUT]
    assert outer.owner is stack and inner.owner is stack
    reference = Stack()
    with torch.no_grad():
        reference.up.copy_(dense(inner))
        reference.down.copy_(dense(outer))
    torch.testing.assert_close(outer(tokens()), reference(tokens()), rtol=1e-5, atol=1e-5)


def test_only_a_and_b_get_gradients():
    layer = randomized(ExpertLoRA(Stack(), RANK, ALPHA, parameter="up"))
    layer(tokens()).square().sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    assert layer.owner.up.grad is None


def test_merge_folds_the_update_into_the_stack_and_unmerge_takes_it_out():
    stack = Stack()
    layer = randomized(ExpertLoRA(stack, RANK, ALPHA, parameter="up"))
    adapted, original, expected = layer(tokens()), stack.up.clone(), dense(layer).detach()
    layer.merge()
    torch.testing.assert_close(stack.up, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(tokens()), adapted, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(stack.up, original, rtol=1e-6, atol=1e-6)


def test_a_2d_weight_is_one_expert():
    router = nn.Linear(D_IN, D_OUT, bias=False)  # stands for a router's [experts, hidden] weight
    layer = randomized(ExpertLoRA(router, RANK, ALPHA, parameter="weight"))
    assert layer.experts == 1 and layer.lora_A.shape == (1, RANK, D_IN)
    expected = tokens() @ (router.weight + (ALPHA / RANK) * layer.lora_B[0] @ layer.lora_A[0]).t()
    torch.testing.assert_close(layer(tokens()), expected, rtol=1e-5, atol=1e-5)


def test_kaiming_start_draws_a_with_each_experts_fan_in():
    layer = ExpertLoRA(Stack(), 64, ALPHA, parameter="up")
    bound = 1 / D_IN**0.5  # kaiming_uniform(a=sqrt(5)) on [r, d_in], as nn.Linear's default and peft's lora_A
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.9 * bound
