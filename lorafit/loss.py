"""Cross-entropy on the supervised tokens only, with the output head run only where labels are.

A causal LM's head (vocab x d) applied at every position is a large share of the FLOPs and most of the
activation memory of a LoRA step. We run the model's trunk, pick the hidden states that predict a
supervised token, and apply the frozen head to those alone, in chunks, computing the gradient with
respect to the hidden states on the way so that no [tokens, vocab] tensor outlives its chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.targets import ARCHITECTURES

IGNORE = -100
CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in fp32, whatever the vocabulary


def head_only_supported(model: nn.Module) -> bool:
    """Architectures in our table compute logits as head(final hidden state), with no scaling or capping."""
    head = model.get_output_embeddings()
    return model.config.model_type in ARCHITECTURES and isinstance(head, nn.Linear)


def supervised_hidden(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states that predict a supervised token [M, d], those tokens [M], their row in the batch [M])."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    # No key/value cache: nothing is generated, and building one costs memory and torch.compile recompiles.
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if head_only_supported(model):
        chosen = model.base_model(**inputs).last_hidden_state[:, :-1][keep]
    else:
        chosen = model(**inputs).logits[:, :-1][keep]
    rows = keep.nonzero()[:, 0]
    return chosen, targets[keep], rows


def _apply_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    if head_only_supported(model):
        return model.get_output_embeddings()(hidden)
    return hidden  # already logits


def loss_sum(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over supervised tokens, their count)."""
    hidden, targets, _ = supervised_hidden(model, batch)
    if targets.numel() == 0:
        return hidden.sum() * 0.0, 0
    head = model.get_output_embeddings()
    if head_only_supported(model) and not head.weight.requires_grad:
        return HeadCrossEntropy.apply(hidden, head.weight, head.bias, targets), targets.numel()
    logits = _apply_head(model, hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum"), targets.numel()


@torch.no_grad()
def sequence_logprobs(model: nn.Module, batch: dict) -> torch.Tensor:
    """Sum of log-probabilities of each row's supervised tokens, [batch]."""
    hidden, targets, rows = supervised_hidden(model, batch)
    totals = torch.zeros(batch["input_ids"].shape[0], dtype=torch.float32, device=hidden.device)
    chunk = max(1, CHUNK_ELEMENTS // model.get_output_embeddings().weight.shape[0])
    for start in range(0, targets.numel(), chunk):
        logits = _apply_head(model, hidden[start : start + chunk]).float()
        picked = logits.log_softmax(-1).gather(1, targets[start : start + chunk, None]).squeeze(1)
        totals.index_add_(0, rows[start : start + chunk], picked)
    return totals


class HeadCrossEntropy(torch.autograd.Function):
    """sum CE(hidden @ Wᵀ + b, targets) for a frozen head, chunked; returns the sum, grads only for `hidden`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):  # noqa: D102
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            stop = start + chunk
            logits = F.linear(hidden[start:stop], weight, bias).float()
            lse = logits.logsumexp(-1)
            picked = targets[start:stop]
            total += (lse - logits.gather(1, picked[:, None]).squeeze(1)).sum()
            if grad is not None:
                # d(sum CE)/d logits = softmax - onehot; then back through the head to the hidden states.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(probs.shape[0], device=probs.device), picked] -= 1.0
                grad[start:stop] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None
