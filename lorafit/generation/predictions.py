"""Evaluation by generation: every evaluation prompt continued with the recipe's [eval] decoding, the text scored
against the prompt's references, and predictions.jsonl (prompt, prediction, references: one line per prompt).

With several processes each generates its share of the prompts; the predictions are gathered, and every process
scores all of them, so each returns the numbers one process would (the main process alone writes the file).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.data.plan import eval_shares
from lorafit.data.references import PromptGroup, prompt_groups
from lorafit.errors import LorafitError
from lorafit.generation.decoding import Decoding, decode, room
from lorafit.generation.scores import score
from lorafit.messages import note
from lorafit.recipe import EvalSection, Recipe
from lorafit.storage import write_atomic
from lorafit.train.processes import all_gather_objects

PREDICTIONS_FILE = "predictions.jsonl"


def judge(scorer, tokenizer, prompts: list[PromptGroup], settings: EvalSection, batch_size: int, *, rank: int = 0,
          world: int = 1, synced: bool = False) -> tuple[dict, list[dict]]:
    """({metric: value, ..., "prompts": count}, one predictions line per prompt), the same on every process.

    `scorer` is the SupervisedLoss around the model (generation runs through it, see decoding.decode). Prompts are
    batched by length (less padding); a prompt that leaves no room for max_new_tokens in the model's context
    keeps its last tokens, and is counted as `prompts_shortened`.
    """
    model, decoding, was_training = scorer.model, Decoding.of(settings), scorer.training
    scorer.eval()  # no dropout
    space = room(model, decoding.max_new_tokens)
    keep = None if space is None else max(1, space)  # the most prompt tokens that leave room for max_new_tokens
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
    mine: dict[int, str] = {}
    for share in eval_shares(len(order), rank, world, batch_size):
        chosen = [order[i] for i in share]
        if not chosen and not synced:
            continue
        # an empty share still generates (one pad token) when the processes' forwards are collectives
        ids = [prompts[i].ids[-keep:] if keep else prompts[i].ids for i in chosen] or [[tokenizer.pad_token_id]]
        for index, done in zip(chosen, decode(model, tokenizer, ids, decoding, scorer=scorer, synced=synced)):
            mine[index] = done.text
    scorer.train(was_training)
    texts = {index: text for part in all_gather_objects(mine) for index, text in part.items()}
    lines = [{"prompt": group.prompt, "prediction": texts[index], "references": group.references}
             for index, group in enumerate(prompts)]
    result = score([line["prediction"] for line in lines], [line["references"] for line in lines], settings.metrics,
                   lowercase=settings.lowercase)
    result["prompts"] = len(prompts)
    shortened = sum(keep is not None and len(group.ids) > keep for group in prompts)
    if shortened:
        result["prompts_shortened"] = shortened
        note(f"{shortened} of {len(prompts)} evaluation prompts kept only their last {keep} tokens, to leave room for "
             f"[eval] max_new_tokens = {decoding.max_new_tokens} in the model's context")
    return result, lines


def generation_scores(scorer, tokenizer, prompts: list[PromptGroup], recipe: Recipe, *, rank: int = 0, world: int = 1,
                      write_to: Path | None = None) -> dict:
    """`judge` with the recipe's settings; the predictions go to `write_to` (pass it on the main process only)."""
    synced = recipe.train.parallel == "fsdp" and world > 1
    result, lines = judge(scorer, tokenizer, prompts, recipe.eval, recipe.train.eval_batch_size, rank=rank,
                          world=world, synced=synced)
    if write_to is not None:
        write_atomic(Path(write_to), "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return result


def eval_prompts(recipe: Recipe, tokenizer, split, console=None) -> list[PromptGroup] | None:
    """The prompts [eval] metrics generate for, read once per run (None when the recipe asks for no metric)."""
    if not recipe.eval.metrics or split is None:
        return None
    groups, unreferenced = prompt_groups(recipe.data, tokenizer, split, recipe.eval.references_field)
    if not groups:
        raise LorafitError(f"no row of the {split.name!r} split has a reference for [eval] metrics (a chat row needs "
                           "an assistant turn at its end); remove [eval] metrics or fix the rows")
    if unreferenced:
        note(f"{split.name!r}: {unreferenced} rows whose conversation does not end with an assistant turn have no "
             "reference, and are left out of [eval] metrics", *([console] if console else []))
    return groups
