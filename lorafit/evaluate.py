"""Held-out loss and perplexity; for classification, accuracy by the log-likelihood of each label word.

Scoring label words with the LM itself needs no generation and no classifier head, so an adapter and
the model merged from it give the same accuracy, and so does any tool that reads the merged model.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from lorafit.data.batches import collate, supervised_count
from lorafit.data.plan import eval_shares
from lorafit.data.tasks import IGNORE, label_token_ids
from lorafit.data.tokenize import TokenizedSplit, tokenize_eval
from lorafit.errors import LorafitError
from lorafit.model.loss import SupervisedLoss
from lorafit.recipe import DataSection, Recipe
from lorafit.train.processes import all_sum, make_accelerator


def _with_label(prompt: list[int], label_ids: list[int]) -> dict:
    """The prompt followed by one candidate label word, supervised on that word only."""
    return {"input_ids": prompt + label_ids, "labels": [IGNORE] * len(prompt) + label_ids}


def _row_logprobs(scorer: nn.Module, batch: dict, rows: int) -> torch.Tensor:
    """Each row's summed log-probability of its supervised tokens, [rows] on the CPU."""
    device = next(scorer.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    return scorer(**batch, per_row=True).cpu()[:rows]  # an empty share scores one dummy row


@torch.no_grad()
def label_logprobs(scorer: nn.Module, prompts: list[list[int]], candidates: list[list[int]], pad_id: int) -> torch.Tensor:
    """[prompts, labels]: the log-likelihood of each label word's tokens after each prompt; `scorer` a SupervisedLoss."""
    with_labels = [collate([_with_label(prompt, ids) for prompt in prompts], pad_id) for ids in candidates]
    return torch.stack([_row_logprobs(scorer, batch, len(prompts)) for batch in with_labels], dim=1)


@torch.no_grad()
def evaluate_split(
    scorer: nn.Module, split: TokenizedSplit, data: DataSection, tokenizer, batch_size: int = 32,
    *, rank: int = 0, world: int = 1,
) -> dict:
    """{loss, perplexity, examples} and, for classification, accuracy; `scorer` is a SupervisedLoss.

    With several processes each scores its share of the rows and the sums are all-reduced, so every rank
    returns the numbers one process would.
    """
    was_training = scorer.training
    scorer.eval()
    device = next(scorer.parameters()).device
    rows = split.examples.to_list()
    pad_id = tokenizer.pad_token_id
    candidates = label_token_ids(data, tokenizer) if data.task == "classification" else None
    logprob, tokens, correct = 0.0, 0, 0
    for indices in eval_shares(len(rows), rank, world, batch_size):
        chunk = [rows[i] for i in indices]
        if candidates is None:
            batch = collate(chunk, pad_id)
            logprob += _row_logprobs(scorer, batch, len(chunk)).sum().item()
            tokens += supervised_count(batch["labels"])
            continue
        scores = label_logprobs(scorer, [row["input_ids"][: row["prompt_len"]] for row in chunk], candidates, pad_id)
        truth = torch.tensor([row["label_index"] for row in chunk], dtype=torch.long)
        correct += int((scores.argmax(1) == truth).sum())
        logprob += scores.gather(1, truth[:, None]).sum().item()
        tokens += sum(len(candidates[i]) for i in truth.tolist())
    scorer.train(was_training)
    logprob, tokens, correct = all_sum([logprob, tokens, correct], device)
    loss = -logprob / max(tokens, 1)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "examples": len(rows)}
    if candidates is not None:
        result["accuracy"] = correct / max(len(rows), 1)
    return result


def evaluate_recipe(recipe: Recipe, *, adapter: Path | None = None, model_dir: Path | None = None, split: str | None = None,
                    predictions: Path | None = None) -> dict:
    """`lorafit eval`: the base model, the base plus an adapter, or a full (merged) model, on one split; with
    [eval] metrics, also the generated text's scores, and its predictions.jsonl written to `predictions`."""
    from lorafit.data.rows import no_evaluation_rows
    from lorafit.generation.predictions import eval_prompts, generation_scores
    from lorafit.generation.scores import require_sacrebleu
    from lorafit.model.load import load_tokenizer

    require_sacrebleu(recipe.eval.metrics)
    if predictions is not None and not recipe.eval.metrics:
        raise LorafitError("--predictions holds generated text, which only [eval] metrics produce; set [eval] metrics")
    if predictions is not None and not Path(predictions).parent.is_dir():
        raise LorafitError(f"--predictions {predictions}: folder {Path(predictions).parent} does not exist; create it")
    name = checked_source(recipe, adapter, model_dir)
    tokenizer = load_tokenizer(name, trust_remote_code=recipe.model.trust_remote_code)
    held_out = tokenize_eval(recipe.data, tokenizer, split)
    if held_out is None:
        raise no_evaluation_rows(recipe.data)
    prompts = eval_prompts(recipe, tokenizer, held_out)
    model, accelerator = inference_model(recipe, name, adapter)
    scorer = SupervisedLoss(model)
    rank, world = accelerator.process_index, accelerator.num_processes
    with accelerator.autocast():
        result = evaluate_split(scorer, held_out, recipe.data, tokenizer, recipe.train.eval_batch_size, rank=rank,
                                world=world)
        if prompts is not None:
            result.update(generation_scores(scorer, tokenizer, prompts, recipe, rank=rank, world=world,
                                            write_to=predictions if accelerator.is_main_process else None))
    return result


def checked_source(recipe: Recipe, adapter: Path | None, model_dir: Path | None) -> str:
    """The model to load (a full model folder, else the recipe's), checked before anything is tokenized or any
    weight is read: safetensors weights, a context that holds max_length, an adapter that fits it."""
    from lorafit.adapter.load import check_adapter
    from lorafit.model.load import check_context_length, check_safetensors, load_config

    name = str(model_dir) if model_dir is not None else recipe.model.name
    check_safetensors(name, allow_pickle=recipe.model.allow_pickle)
    config = load_config(name, trust_remote_code=recipe.model.trust_remote_code)
    check_context_length(config, recipe.data.max_length)
    if adapter is not None:
        check_adapter(config, Path(adapter))
    return name


def inference_model(recipe: Recipe, name: str, adapter: Path | None):
    """(the model `name` with `adapter` loaded, in eval mode on this process's device, its accelerator)."""
    from lorafit.adapter.load import load_adapter
    from lorafit.model.load import load_model, resolve_precision

    weights_dtype, mixed_precision = resolve_precision(recipe.model.dtype, recipe.train.mixed_precision)
    model = load_model(name, weights_dtype, trust_remote_code=recipe.model.trust_remote_code,
                       allow_pickle=recipe.model.allow_pickle)
    if adapter is not None:
        load_adapter(model, Path(adapter))
    accelerator = make_accelerator(mixed_precision)
    return model.to(accelerator.device).eval(), accelerator
