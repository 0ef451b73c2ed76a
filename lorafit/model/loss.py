"""Cross-entropy on the supervised tokens only, with the output head run only where labels are.

A causal LM's head (vocab x d) applied at every position is a large share of the FLOPs and most of the
activation memory of a LoRA step. We run the trunk, pick the hidden states that predict a supervised token,
and turn only those into logits, in chunks, so that no [tokens, vocab] tensor outlives its chunk. When a
model's logits are exactly head(last hidden state) and the head is frozen, the gradient with respect to
the hidden states is computed on the way (HeadCrossEntropy). Any other model (Gemma's soft-capped logits, a
head that is a LoRA target) gets its logits from its own forward after the trunk, chunk by chunk, each
chunk recomputed in backward; only a model whose trunk cannot be told apart is scored on its full logits.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorafit.data.batches import supervised_positions
from lorafit.lora.dropout import keys_selected

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in fp32, whatever the vocabulary


# Model types whose *ForCausalLM.forward computes logits = lm_head(base_model(...).last_hidden_state) and does
# nothing more to them (read in transformers 5.x modeling code). A type joins with a tiny config in
# tests/conftest.py, where tests/model/test_loss.py checks it against the model's own logits. Left out on purpose,
# among others: Gemma-2/3 soft-cap the logits (tanh), Cohere multiplies them by logit_scale, Granite divides
# them by logits_scaling, Falcon-H1 multiplies them by lm_head_multiplier.
PLAIN_HEAD_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox", "bloom", "opt",
                                    "qwen3_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3"})


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


class _GivenTrunkOutput:
    """What a trunk returns, holding given hidden states; any other field a model's forward reads is None."""

    def __init__(self, hidden: torch.Tensor):
        self.last_hidden_state = hidden

    def __getattr__(self, name: str):
        return None

    def __getitem__(self, index):
        return (self.last_hidden_state,)[index]


class _GivenTrunk(nn.Module):
    """Stands in for a causal LM's trunk, so that the model's own forward runs only what follows it."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs) -> _GivenTrunkOutput:
        return _GivenTrunkOutput(self.hidden)


def _own_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [n, vocab] of hidden states [n, d], by the model's own forward with its trunk given: its head and
    whatever the model does to the logits (Gemma's soft-cap, Cohere's scale, ...), exactly as it does them."""
    prefix = model.base_model_prefix
    trunk = getattr(model, prefix)
    setattr(model, prefix, _GivenTrunk(hidden[None]))
    try:
        ids = torch.zeros((1, hidden.shape[0]), dtype=torch.long, device=hidden.device)
        return model(input_ids=ids, use_cache=False).logits[0]
    finally:
        setattr(model, prefix, trunk)


def head_logits(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """hidden states [n, d] -> the model's logits [n, vocab]: the plain head itself where `plain_head` finds
    one, else the model's own forward after its trunk; None when the trunk is not a part of its own."""
    head = plain_head(model)
    if head is not None:
        return head
    trunk = getattr(model, model.base_model_prefix, None)
    return partial(_own_head, model) if isinstance(trunk, nn.Module) and trunk is not model else None


def _predicting_states(model: nn.Module, batch: dict, positions: torch.Tensor, logits_of) -> torch.Tensor:
    """What predicts each supervised token: last hidden states [M, d] when `logits_of` is given, else logits
    [M, vocab] from the model's full forward."""
    # No key/value cache: nothing is generated, and building one costs memory and torch.compile recompiles.
    # No attention mask for packed sequences: their position ids say where each packed row starts (lorafit.data.packing).
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if batch.get(key) is not None}
    inputs["use_cache"] = False
    states = model.base_model(**inputs).last_hidden_state if logits_of is not None else model(**inputs).logits
    return states.reshape(-1, states.shape[-1]).index_select(0, positions)


def _chunk_rows(model: nn.Module) -> int:
    """Rows of logits per chunk: CHUNK_ELEMENTS logits, whatever the vocabulary."""
    return max(1, CHUNK_ELEMENTS // model.get_output_embeddings().weight.shape[0])


def _chunk_loss(hidden, targets, positions, model, logits_of, label_smoothing: float) -> torch.Tensor:
    """Summed CE of one chunk; a LoRA head keys its dropout by the chunk's positions in the batch."""
    with keys_selected(model.get_output_embeddings(), positions):
        return F.cross_entropy(logits_of(hidden).float(), targets, reduction="sum", label_smoothing=label_smoothing)


def loss_sum(model: nn.Module, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over supervised tokens, their count); with `label_smoothing` ε, each target
    is (1 - ε) one-hot plus ε spread evenly over the vocabulary, as F.cross_entropy(label_smoothing=ε) defines it."""
    positions, targets = _supervised_targets(batch)
    head, logits_of = plain_head(model), head_logits(model)
    states = _predicting_states(model, batch, positions, logits_of)
    if targets.numel() == 0:
        return states.sum() * 0.0, 0
    if head is not None and not head.weight.requires_grad:
        return HeadCrossEntropy.apply(states, head.weight, head.bias, targets, label_smoothing), targets.numel()
    if logits_of is None:  # the model's full logits, already picked
        return F.cross_entropy(states.float(), targets, reduction="sum", label_smoothing=label_smoothing), targets.numel()
    chunk, total = _chunk_rows(model), None
    for start in range(0, targets.numel(), chunk):
        part = slice(start, start + chunk)
        # each chunk's logits are recomputed in backward rather than kept: one chunk of them lives at a time
        loss = checkpoint(_chunk_loss, states[part], targets[part], positions[part], model, logits_of,
                          label_smoothing, use_reentrant=False)
        total = loss if total is None else total + loss
    return total, targets.numel()


@torch.no_grad()
def sequence_logprobs(model: nn.Module, batch: dict) -> torch.Tensor:
    """Sum of log-probabilities of each row's supervised tokens, [batch]."""
    positions, targets = _supervised_targets(batch)
    batch_size, length = batch["input_ids"].shape
    rows = positions // length  # the batch row of each supervised token
    logits_of = head_logits(model)
    states = _predicting_states(model, batch, positions, logits_of)
    totals = torch.zeros(batch_size, dtype=torch.float32, device=states.device)
    chunk = _chunk_rows(model) if logits_of is not None else targets.numel() or 1
    for start in range(0, targets.numel(), chunk):
        part = slice(start, start + chunk)
        logits = (states[part] if logits_of is None else logits_of(states[part])).float()
        picked = logits.log_softmax(-1).gather(1, targets[part, None]).squeeze(1)
        totals.index_add_(0, rows[part], picked)
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
