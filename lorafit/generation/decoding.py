"""Decoding: how new tokens are chosen (greedy, sampled, or beam search) for a batch of left-padded prompts, and
where a completion ends: an end token, a stop string, max_new_tokens, or the end of the model's context.

The search itself is transformers' `generate` (KV cache, beam search, no-repeat n-grams, length penalty); this
module pads the prompts, sets the options, and reads each completion back out of the padded output.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from lorafit.model.load import context_length
from lorafit.recipe import EvalSection

END_TOKEN, STOP_STRING, MAX_NEW_TOKENS, CONTEXT = "end token", "stop string", "max_new_tokens", "context"


@dataclass(frozen=True)
class Decoding:
    """How new tokens are chosen: greedy when temperature is 0 and num_beams 1, sampled from the top-p nucleus
    (seeded) when temperature > 0, else beam search whose finished beams are ranked by
    sum of log-probabilities / new tokens ** length_penalty. A completion ends before the first stop string."""

    max_new_tokens: int = 128
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @classmethod
    def of(cls, settings: EvalSection, **changes) -> Decoding:
        """The recipe's [eval] decoding, with `changes` (e.g. from the command line) on top."""
        keys = {field.name for field in fields(cls)}
        given = {key: value for key, value in settings.model_dump().items() if key in keys}
        return cls(**{**given, "stop": tuple(settings.stop), **changes})


@dataclass(frozen=True)
class Completion:
    """One prompt's new tokens up to and with the one that ended it, their text without any stop string, and why
    it ended (END_TOKEN, STOP_STRING, MAX_NEW_TOKENS or CONTEXT)."""

    ids: list[int]
    text: str
    stop: str


def end_tokens(model, tokenizer) -> list[int]:
    """The tokenizer's eos and every end token the model's generation config names (e.g. a chat end-of-turn)."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({token for token in [tokenizer.eos_token_id, *configured] if token is not None})


def room(model, prompt_length: int) -> int | None:
    """New tokens that fit after a prompt of `prompt_length` tokens (None: the model has no fixed context)."""
    context = context_length(model.config)
    return None if context is None else context - prompt_length


def options(decoding: Decoding, tokenizer, ends: list[int]) -> dict:
    """Keyword arguments of transformers' generate for `decoding` (every choice explicit, so a model's
    generation_config.json cannot add sampling or a repetition penalty of its own)."""
    chosen = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "num_beams": decoding.num_beams,
              "length_penalty": decoding.length_penalty, "no_repeat_ngram_size": decoding.no_repeat_ngram_size,
              "repetition_penalty": 1.0, "eos_token_id": ends, "pad_token_id": tokenizer.pad_token_id}
    if decoding.temperature > 0:
        chosen.update(do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p, top_k=0)
    if decoding.stop:  # a beam that completes a stop string is finished, as one that reaches an end token
        chosen.update(stop_strings=list(decoding.stop), tokenizer=tokenizer)
    return chosen


@torch.no_grad()
def decode(model, tokenizer, prompts: list[list[int]], decoding: Decoding, *, streamer=None, scorer=None,
           synced: bool = False) -> list[Completion]:
    """Continue every prompt in one batch: prompts left-padded (attention 0 on the padding; the model derives its
    positions from the mask), the KV cache on. With `scorer` (the SupervisedLoss around `model`) generation runs
    through it, and `synced` keeps every process generating until all are done: FSDP's forwards are collectives.
    The caller makes sure each prompt leaves room for a new token."""
    ends = end_tokens(model, tokenizer)
    longest = max(len(ids) for ids in prompts)
    space = room(model, longest)
    limit = decoding.max_new_tokens if space is None else max(1, min(decoding.max_new_tokens, space))
    input_ids = torch.full((len(prompts), longest), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, longest - len(ids):] = 1
    device = next(model.parameters()).device
    chosen = {"max_new_tokens": limit, "streamer": streamer, "synced_gpus": synced, **options(decoding, tokenizer, ends)}
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if scorer is not None:
        output = scorer(input_ids=input_ids, attention_mask=attention_mask, generate=chosen)
    else:
        output = model.generate(input_ids, attention_mask=attention_mask, **chosen)
    return [completion(tokenizer, row[longest:].tolist(), ends, decoding.stop, limit,
                       ran_out=limit < decoding.max_new_tokens) for row in output.cpu()]


def completion(tokenizer, new: list[int], ends: list[int], stop: tuple[str, ...], limit: int, *,
               ran_out: bool = False) -> Completion:
    """Read one row of generate's output: cut at its first end token (finished rows are padded after it), then
    before the first stop string, keeping the tokens up to the one that completed it."""
    end = next((i for i, token in enumerate(new) if token in ends), None)
    if end is not None:
        new = new[: end + 1]
    text = tokenizer.decode(new, skip_special_tokens=True)
    kept = before_stop(text, stop)
    if kept is not None:
        count = next(k for k in range(1, len(new) + 1)
                     if before_stop(tokenizer.decode(new[:k], skip_special_tokens=True), stop) is not None)
        return Completion(new[:count], kept, STOP_STRING)
    if end is not None:
        return Completion(new, text, END_TOKEN)
    return Completion(new, text, CONTEXT if ran_out and len(new) == limit else MAX_NEW_TOKENS)


def before_stop(text: str, stop: tuple[str, ...]) -> str | None:
    """`text` up to the first stop string in it, or None when it holds none."""
    cut = min((at for at in (text.find(s) for s in stop) if at >= 0), default=-1)
    return text[:cut] if cut >= 0 else None


def held_back(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """(the part of streamed `text` that can be shown now, whether a stop string was reached): text up to a stop
    string, or all of it but a tail that could still become one."""
    kept = before_stop(text, stop)
    if kept is not None:
        return kept, True
    hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold], False
