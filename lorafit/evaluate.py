"""Held-out loss and perplexity; for classification, accuracy by the log-likelihood of each label word.

Scoring label words with the LM itself needs no generation and no classifier head, so an adapter and
the model merged from it give the same accuracy, and so does any tool that reads the merged model.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from lorafit.data import IGNORE, TokenizedSplit, collate, label_token_ids, tokenize_split
from lorafit.loss import sequence_logprobs
from lorafit.recipe import DataSection, Recipe


def _batches(rows: list[dict], size: int):
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _with_label(row: dict, label_ids: list[int]) -> dict:
    """The example's prompt followed by one candidate label word, supervised on that word only."""
    prompt = row["input_ids"][: row["prompt_len"]]
    return {"input_ids": prompt + label_ids, "labels": [IGNORE] * len(prompt) + label_ids}


def _to(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def evaluate_split(model: nn.Module, split: TokenizedSplit, data: DataSection, tokenizer, batch_size: int = 32) -> dict:
    """{loss, perplexity, examples} and, for classification, accuracy."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = split.examples.to_list()
    pad_id = tokenizer.pad_token_id
    total_logprob, total_tokens = 0.0, 0
    correct = 0
    candidates = label_token_ids(data, tokenizer) if data.task == "classification" else None
    for chunk in _batches(rows, batch_size):
        if candidates is None:
            batch = collate(chunk, pad_id)
            total_logprob += sequence_logprobs(model, _to(batch, device)).sum().item()
            total_tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
            continue
        scores = torch.stack(
            [
                sequence_logprobs(model, _to(collate([_with_label(r, ids) for r in chunk], pad_id), device)).cpu()
                for ids in candidates
            ],
            dim=1,
        )
        truth = torch.tensor([r["label_index"] for r in chunk])
        correct += int((scores.argmax(1) == truth).sum())
        total_logprob += scores.gather(1, truth[:, None]).sum().item()
        total_tokens += sum(len(candidates[i]) for i in truth.tolist())
    model.train(was_training)
    loss = -total_logprob / max(total_tokens, 1)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "examples": len(rows)}
    if candidates is not None:
        result["accuracy"] = correct / max(len(rows), 1)
    return result


def evaluate_recipe(recipe: Recipe, *, adapter: Path | None = None, model_dir: Path | None = None, split: str | None = None) -> dict:
    """`lorafit eval`: the base model, the base plus an adapter, or a full (merged) model, on one split."""
    from lorafit.adapter import check_adapter, load_adapter
    from lorafit.model import load_config, load_model, load_tokenizer, meta_model

    name = str(model_dir) if model_dir is not None else recipe.model.name
    if adapter is not None:  # refuse a misfit before tokenizing anything or reading weights
        check_adapter(meta_model(load_config(name, trust_remote_code=recipe.model.trust_remote_code)), Path(adapter))
    tokenizer = load_tokenizer(name, trust_remote_code=recipe.model.trust_remote_code)
    held_out = tokenize_split(recipe.data, tokenizer, split or recipe.data.eval_split)
    model = load_model(name, recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code)
    if adapter is not None:
        load_adapter(model, Path(adapter))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return evaluate_split(model.to(device), held_out, recipe.data, tokenizer, recipe.train.eval_batch_size)
