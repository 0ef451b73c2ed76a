"""Cross-entropy on the supervised tokens only, with the output head run only where labels are.

A causal LM's head (vocab x d) applied at every position is a large share of the FLOPs and most of the
activation memory of a LoRA step. When a model's logits are exactly head(last hidden state), we run the
trunk, pick the hidden states that predict a supervised token, and apply the frozen head to those alone,
in chunks, computing the gradient with respect to the hidden states on the way so that no [tokens, vocab]
tensor outlives its chunk. Any other model is scored on its own full logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.data.batches import supervised_positions

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in fp32, whatever the vocabulary


# Model types whose *ForCausalLM.forward computes logits = lm_head(base_model(...).last_hidden_state) and does
# nothing more to them (read in transformers 5.x modeling code). A type joins with a tiny config in
# tests/conftest.py, where tests/model/test_loss.py checks it against the model's own logits. Left out on purpose,
# among others: Gemma-2/3 soft-cap the logits (tanh), Cohere multiplies them by logit_scale, Granite divides
# them by logits_scaling, Falcon-H1 multiplies them by lm_head_multiplier.
PLAIN_HEAD_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox", "bloom", "opt"})


# Config attributes by which transformers models scale, cap or cut their logits after the head. A model whose
# config sets one is not trusted with the head-only path even if its type is listed (remote code, a variant).
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",  # Gemma-2/3/4, VaultGemma, NanoChat: cap * tanh(logits / cap)
    "logits_soft_cap",  # RecurrentGemma
    "output_logit_soft_cap",  # xLSTM
    "logit_scale",  # Cohere: logits * scale
    "logits_scaling",  # Granite: logits / scaling; HyperCLOVA X: logits * scaling
    "lm_head_multiplier",  # Falcon-H1: logits * multiplier
    "unpadded_vocab_size",  # logits cut to the unpadded vocabulary
)


def logit_transform(config) -> str | None:
    """The config attribute by which the model changes its logits after the head, or None."""
    return next((name for name in LOGIT_TRANSFORMS if getattr(config, name, None) is not None), None)


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The output head when the model's logits are exactly head(last hidden state), else None.

    Only then may the head run on the supervised positions alone. Models that transform their logits are
    scored on model(...).logits instead of re-applying their transform here: their own forward is right by
    construction, where a copy of each architecture's scaling would drift from it unnoticed.
    """
    head = model.get_output_embeddings()
    plain = model.config.model_type in PLAIN_HEAD_MODEL_TYPES and logit_transform(model.config) is None
    return head if plain and isinstance(head, nn.Linear) else None


def _supervised_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat [batch · length] index of each position that predicts a supervised token [M], that token [M]).

    Collated batches carry them, built on the CPU; for any other batch they are derived here from the labels.
    """
    if "positions" in batch:
        return batch["positions"], batch["targets"]
    return supervised_positions(batch["labels"])


def _predicting_states(model: nn.Module, batch: dict, positions: torch.Tensor, head: nn.Linear | None) -> torch.Tensor:
    """What predicts each supervised token: last hidden states [M, d] when `head` is given, else logits [M, vocab]."""
    # No key/value cache: nothing is generated, and building one costs memory and torch.compile recompiles.
    # No attention mask for packed sequences: their position ids say where each packed row starts (lorafit.data.packing).
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if batch.get(key) is not None}
    inputs["use_cache"] = False
    states = model.base_model(**inputs).last_hidden_state if head is not None else model(**inputs).logits
    return states.reshape(-1, states.shape[-1]).index_select(0, positions)


def _logits(states: torch.Tensor, head: nn.Linear | None) -> torch.Tensor:
    """Logits from `_predicting_states`: the head applied to hidden states, or the logits as they are."""
    return states if head is None else head(states)


def loss_sum(model: nn.Module, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over supervised tokens, their count); with `label_smoothing` ε, each target
    is (1 - ε) one-hot plus ε spread evenly over the vocabulary, as F.cross_entropy(label_smoothing=ε) defines it."""
    positions, targets = _supervised_targets(batch)
    head = plain_head(model)
    states = _predicting_states(model, batch, positions, head)
    if targets.numel() == 0:
        return states.sum() * 0.0, 0
    if head is not None and not head.weight.requires_grad:
        return HeadCrossEntropy.apply(states, head.weight, head.bias, targets, label_smoothing), targets.numel()
    logits = _logits(states, head).float()
    return F.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing), targets.numel()


@torch.no_grad()
def sequence_logprobs(model: nn.Module, batch: dict) -> torch.Tensor:
    """Sum of log-probabilities of each row's supervised tokens, [batch]."""
    positions, targets = _supervised_targets(batch)
    batch_size, length = batch["input_ids"].shape
    rows = positions // length  # the batch row of each supervised token
    head = plain_head(model)
    states = _predicting_states(model, batch, positions, head)
    totals = torch.zeros(batch_size, dtype=torch.float32, device=states.device)
    chunk = max(1, CHUNK_ELEMENTS // (states.shape[-1] if head is None else head.out_features))
    for start in range(0, targets.numel(), chunk):
        logits = _logits(states[start : start + chunk], head).float()
        picked = logits.log_softmax(-1).gather(1, targets[start : start + chunk, None]).squeeze(1)
        totals.index_add_(0, rows[start : start + chunk], picked)
    return totals


class HeadCrossEntropy(torch.autograd.Function):
    """sum CE(hidden @ Wᵀ + b, targets) for a frozen head, chunked; returns the sum, grads only for `hidden`.

    With label smoothing ε a token's loss is (1 - ε)·(lse - z_target) + ε·(lse - mean(z)), that is
    lse - (1 - ε)·z_target - ε·mean(z), whose gradient in the logits is softmax - (1 - ε)·onehot - ε/vocab.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, label_smoothing=0.0):  # noqa: D102
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        keep = 1.0 - label_smoothing
        for start in range(0, hidden.shape[0], chunk):
            stop = start + chunk
            logits = F.linear(hidden[start:stop], weight, bias).float()
            lse = logits.logsumexp(-1)
            picked = targets[start:stop]
            losses = lse - keep * logits.gather(1, picked[:, None]).squeeze(1)
            if label_smoothing:
                losses -= label_smoothing * logits.mean(-1)
            total += losses.sum()
            if grad is not None:
                # d(sum CE)/d logits as above; then back through the head to the hidden states.
                probs = logits.sub_(lse[:, None]).exp_()
                if label_smoothing:
                    probs -= label_smoothing / probs.shape[1]
                probs[torch.arange(probs.shape[0], device=probs.device), picked] -= keep
                grad[start:stop] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


class SupervisedLoss(nn.Module):
    """The model with its loss as its forward, so that DDP's and FSDP's hooks fire when the loop calls it.

    Calling the wrapped model's parts from outside a DDP/FSDP wrapper would skip the gradient all-reduce
    (DDP) or the weight all-gather (FSDP); everything the loop and evaluation compute goes through here.
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing  # of the training loss; per_row log-probabilities never smooth

    def forward(self, per_row: bool = False, generate: dict | None = None, **batch) -> torch.Tensor:
        """The summed cross-entropy of the supervised tokens; with `per_row`, each row's summed log-probability;
        with `generate` (transformers' generate keywords), the generated sequences.

        `batch` as collated: input_ids, attention_mask, labels, and optionally positions/targets, position_ids.
        """
        if generate is not None:  # through this module, so that FSDP gathers the weights it holds (embeddings, head)
            return self.model.generate(batch["input_ids"], attention_mask=batch.get("attention_mask"), **generate)
        if per_row:
            return sequence_logprobs(self.model, batch)
        return loss_sum(self.model, batch, self.label_smoothing)[0]
