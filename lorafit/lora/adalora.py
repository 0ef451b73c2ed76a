"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): ΔW = s·P·Λ·Q with ranks that shrink where they matter least.

Each adapted slice holds r_init triplets (P column, λ, Q row). After every optimizer step the sensitivity |w·∂L/∂w|
of each entry is smoothed (EMA, beta1) and its uncertainty |I − Ī| too (EMA, beta2); a triplet's importance is
Ī·Ū of λ plus the means over its P column and Q row. The total budget of triplets falls from n·r_init to
n·r_target on the paper's cubic schedule, and every `delta_t` steps the least important triplets get λ = 0.
The orthogonality penalty ‖PᵀP − I‖_F + ‖QQᵀ − I‖_F keeps P and Q close to singular vectors.

A module's update is that of the kept triplets alone (`kept`), so it is saved as a plain LoRA of that rank
(lorafit.adapter.convert).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorafit.lora.linear import LoRALinear


class AdaLoRALinear(LoRALinear):
    """A LoRALinear with a trainable Λ (`lora_E`, one λ per triplet): y = base(x) + s·P·(Λ·Q)·x.

    `lora_A` is Q [n·r, d_in] and `lora_B` is P [Σ slice sizes, r], stacked by slice as in LoRALinear.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, **options):
        super().__init__(base, rank, alpha, dropout, **options)
        self.lora_E = nn.Parameter(torch.zeros(self.lora_A.shape[0], device=self.lora_A.device))
        if not self.lora_A.is_meta:  # peft's start: P and Q small and random, Λ = 0, so ΔW = 0
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)

    @property
    def lora_params(self) -> int:
        return super().lora_params + self.lora_E.numel()

    def effective_A(self) -> torch.Tensor:
        return self.lora_A * self.lora_E[:, None]  # Λ·Q: Λ folded in, so one matmul down and one up

    def kept(self) -> torch.Tensor:
        """Booleans over the n·r triplets: those not pruned (λ ≠ 0)."""
        return self.lora_E.detach() != 0

    def slice_ranks(self) -> list[int]:
        return [int(k.sum()) for k in self.kept().split(self.rank)]


@dataclass(frozen=True)
class Budget:
    """The paper's schedule (eq. 10) of the total number of triplets b(t), and whether step t prunes."""

    initial: int  # n·r_init over all slices
    target: int  # n·r_target
    tinit: int
    tfinal: int
    delta_t: int
    total_steps: int

    def at(self, step: int) -> tuple[int, bool]:
        if step <= self.tinit:
            return self.initial, False
        if step > self.total_steps - self.tfinal:
            return self.target, True
        progress = (step - self.tinit) / (self.total_steps - self.tfinal - self.tinit)
        budget = int((self.initial - self.target) * (1 - progress) ** 3 + self.target)
        return budget, step % self.delta_t == 0


class RankAllocator:
    """Importance scores and pruning over all AdaLoRA layers of a model, run by lorafit's loop after each step."""

    def __init__(self, layers: dict[str, AdaLoRALinear], budget: Budget, *, beta1: float, beta2: float,
                 orth_reg_weight: float):
        self.layers, self.budget = layers, budget
        self.beta1, self.beta2, self.orth_reg_weight = beta1, beta2, orth_reg_weight
        self.sensitivity: dict[int, torch.Tensor] = {}  # Ī per parameter (by id)
        self.uncertainty: dict[int, torch.Tensor] = {}  # Ū per parameter
        self.final_keep: dict[str, torch.Tensor] | None = None  # fixed once the budget reaches the target

    def parameters(self):
        for layer in self.layers.values():
            yield from (layer.lora_A, layer.lora_E, layer.lora_B)

    @torch.no_grad()
    def update_importance(self) -> None:
        """EMA of the sensitivity |w·g| and of its deviation from that EMA, entry by entry (paper eq. 8-9)."""
        for p in self.parameters():
            if p.grad is None:
                continue
            now = (p * p.grad).abs()
            key = id(p)
            if key not in self.sensitivity:
                self.sensitivity[key], self.uncertainty[key] = torch.zeros_like(p), torch.zeros_like(p)
            ema = self.sensitivity[key].mul_(self.beta1).add_(now, alpha=1 - self.beta1)
            self.uncertainty[key].mul_(self.beta2).add_((now - ema).abs(), alpha=1 - self.beta2)

    def score(self, p: torch.Tensor) -> torch.Tensor:
        return self.sensitivity[id(p)] * self.uncertainty[id(p)]

    def triplet_scores(self, layer: AdaLoRALinear) -> torch.Tensor:
        """[n·r] importance of each triplet: its λ's score plus the mean score over its Q row and P column."""
        p_scores = torch.cat([block.mean(dim=0) for block in self.score(layer.lora_B).split(layer.slice_sizes)])
        return self.score(layer.lora_E) + self.score(layer.lora_A).mean(dim=1) + p_scores

    @torch.no_grad()
    def prune_to(self, budget: int) -> dict[str, torch.Tensor]:
        """Zero the λ of every triplet below the budget's importance threshold; returns the kept masks."""
        scores = {path: self.triplet_scores(layer) for path, layer in self.layers.items()}
        everything = torch.cat(list(scores.values()))
        cut = everything.numel() - budget
        threshold = torch.kthvalue(everything, cut).values if cut > 0 else everything.min() - 1
        keep = {path: s > threshold for path, s in scores.items()}
        self.apply(keep)
        return keep

    @torch.no_grad()
    def apply(self, keep: dict[str, torch.Tensor]) -> None:
        for path, layer in self.layers.items():
            layer.lora_E.masked_fill_(~keep[path], 0.0)

    def after_step(self, step: int) -> None:
        """Called with the number of steps done, after optimizer.step() and before the gradients are cleared."""
        budget, prune = self.budget.at(step)
        final = self.budget.total_steps - self.budget.tfinal
        if step <= final:
            self.update_importance()
            if prune or step == final:  # the target is always reached, whatever delta_t
                keep = self.prune_to(budget)
                if step == final:
                    self.final_keep = keep
        elif self.final_keep is not None:
            self.apply(self.final_keep)  # the final ranks stay fixed while training finishes

    def orthogonality_gradients(self) -> None:
        """Add the gradient of orth_reg_weight · mean(‖PᵀP − I‖_F, ‖QQᵀ − I‖_F) to P's and Q's gradients.

        Through autograd.grad rather than backward, so DDP's gradient hooks see only the model's own backward.
        """
        if self.orth_reg_weight == 0:
            return
        terms, params = [], []
        for layer in self.layers.values():
            params += [layer.lora_A, layer.lora_B]
            for q in layer.lora_A.split(layer.rank):
                terms.append(torch.linalg.matrix_norm(q @ q.t() - torch.eye(q.shape[0], device=q.device)))
            for p in layer.lora_B.split(layer.slice_sizes):
                terms.append(torch.linalg.matrix_norm(p.t() @ p - torch.eye(p.shape[1], device=p.device)))
        penalty = self.orth_reg_weight * torch.stack(terms).mean()
        for param, grad in zip(params, torch.autograd.grad(penalty, params)):
            param.grad = grad if param.grad is None else param.grad + grad

    def ranks(self) -> dict[str, list[int]]:
        """Kept triplets of every module, one count per slice."""
        return {path: layer.slice_ranks() for path, layer in self.layers.items()}


def rank_allocator(layers: dict[str, AdaLoRALinear], lora, total_steps: int) -> RankAllocator:
    """The allocator for a run of `total_steps` from a recipe's [lora] section (its [lora.adalora] keys); refuses a
    schedule that leaves no steps to prune in."""
    from lorafit.errors import LorafitError

    keys = lora.adalora
    if keys.tinit + keys.tfinal >= total_steps:
        raise LorafitError(
            f"[lora.adalora] tinit + tfinal = {keys.tinit + keys.tfinal} leaves none of the {total_steps} steps for "
            "AdaLoRA to prune in; lower them below the run's steps"
        )
    slices = sum(len(layer.slice_sizes) for layer in layers.values())
    budget = Budget(slices * keys.init_rank, slices * keys.target_rank, keys.tinit, keys.tfinal, keys.delta_t,
                    total_steps)
    return RankAllocator(layers, budget, beta1=keys.beta1, beta2=keys.beta2, orth_reg_weight=keys.orth_reg_weight)
