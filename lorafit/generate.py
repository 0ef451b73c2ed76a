"""`lorafit generate`: try an adapter (or a merged model) on prompts, formatted exactly as training formatted them.

Completion and text recipes continue the prompt token by token (greedy, or sampled with temperature and top-p)
until the end token, streaming the text as it comes; classification recipes score each label word after the
prompt, as `lorafit eval` does, and give the most likely label and its probability among the labels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TextStreamer

from lorafit.data import prompts
from lorafit.data.tasks import label_token_ids
from lorafit.errors import LorafitError
from lorafit.evaluate import checked_source, inference_model, label_logprobs
from lorafit.messages import note
from lorafit.model.loss import SupervisedLoss
from lorafit.recipe import DataSection, Recipe
from lorafit.storage import input_file

CHAT_TEMPLATE = "chat_template.jinja"
# Called with (prompt index, text, done): pieces of a completion as they are decoded; done on its last call.
Stream = Callable[[int, str, bool], None]


@dataclass(frozen=True)
class Sampling:
    """How new tokens are chosen: greedy when temperature is 0, else sampled from the top-p nucleus, seeded."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def generate(recipe: Recipe, prompts: list[str | dict], *, adapter: Path | None = None, model_dir: Path | None = None,
             sampling: Sampling = Sampling(), stream: Stream | None = None) -> list[dict]:
    """One result per prompt: {prompt, completion, new_tokens, stop} or, for classification, {prompt, label,
    probability, probabilities}. A prompt is text for the recipe's input field, or a row holding that field."""
    from lorafit.model.load import load_tokenizer

    if not prompts:
        raise LorafitError('no prompt given; pass one or more PROMPT arguments or --prompts FILE')
    if not math.isfinite(sampling.temperature):
        raise LorafitError(f"--temperature {sampling.temperature} is not a finite number; give e.g. 0.7 (0 is greedy)")
    name = checked_source(recipe, adapter, model_dir)
    tokenizer = load_tokenizer(name, trust_remote_code=recipe.model.trust_remote_code)
    saved = Path(adapter) / CHAT_TEMPLATE if adapter is not None else None
    if saved is not None and saved.is_file():  # the chat template training used, saved beside the adapter
        tokenizer.chat_template = saved.read_text(encoding="utf-8")
    if any(isinstance(prompt, str) for prompt in prompts):
        text_fills(recipe.data)
    encoded = [prompt_ids(recipe.data, tokenizer, prompt, index) for index, prompt in enumerate(prompts)]
    candidates = label_token_ids(recipe.data, tokenizer) if recipe.data.task == "classification" else None
    model, accelerator = inference_model(recipe, name, adapter)
    with accelerator.autocast():
        if candidates is not None:
            return classify(SupervisedLoss(model), recipe.data, prompts, encoded, candidates, tokenizer.pad_token_id)
        return [complete(model, tokenizer, prompt, ids, sampling, index, stream)
                for index, (prompt, ids) in enumerate(zip(prompts, encoded))]


def prompt_ids(data: DataSection, tokenizer, prompt: str | dict, index: int = 0) -> list[int]:
    """The prompt's tokens exactly as a training row starts (lorafit.data.prompts' rule): the recipe's template, or
    the chat template with the assistant's turn opened."""
    try:
        return prompts.prompt_ids(data, tokenizer, prompt)
    except KeyError as missing:
        raise LorafitError(f"prompt {index + 1} has no field {missing}; give every field the template names: "
                           f"{prompts_form(data)}") from None


def text_fills(data: DataSection) -> None:
    """Say which field a plain-text prompt fills when the template has others, which it leaves empty."""
    if data.task == "chat":
        return
    main = prompts.main_field(data)
    others = [f"{{{name}}}" for name in prompts.template_fields(data) if name != main]
    if others:
        note(f"a plain prompt fills the template's {{{main}}} and leaves {', '.join(others)} empty; to give every "
             f"field: {prompts_form(data)}")


def prompts_form(data: DataSection) -> str:
    """How to give prompt rows with every field of the template: --prompts FILE.jsonl, and a line of it."""
    example = {field: "..." for field in prompts.template_fields(data).values()}
    return f"--prompts FILE.jsonl with one row per line, such as {json.dumps(example)}"


def prompt_header(prompt: str | dict) -> str:
    """A prompt as the one line of text named above its completion: the text, or a row's fields as name: value."""
    if isinstance(prompt, str):
        return prompt
    return "  ".join(f"{name}: {value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}"
                     for name, value in prompt.items())


def empty_reason(result: dict) -> str | None:
    """Why a completion holds no text, or None when it holds some."""
    if "completion" not in result or result["completion"].strip():
        return None
    if result["stop"] == "end token" and result["new_tokens"] == 1:
        return "the model's first new token was its end token, so it stopped at once"
    return f"its {result['new_tokens']} new tokens decode to no text (stopped by {result['stop']})"


@torch.no_grad()
def classify(scorer, data: DataSection, prompts: list, encoded: list[list[int]], candidates: list[list[int]],
             pad_id: int) -> list[dict]:
    """The most likely label of each prompt and its probability, normalised over the recipe's labels."""
    probabilities = label_logprobs(scorer, encoded, candidates, pad_id).softmax(dim=1)
    results = []
    for prompt, row in zip(prompts, probabilities.tolist()):
        best = max(range(len(row)), key=row.__getitem__)
        results.append({"prompt": prompt, "label": data.labels[best], "probability": row[best],
                        "probabilities": dict(zip(data.labels, row))})
    return results


@torch.no_grad()
def complete(model, tokenizer, prompt, ids: list[int], sampling: Sampling, index: int = 0,
             stream: Stream | None = None) -> dict:
    """Continue one prompt until an end token, max_new_tokens, or the end of the model's context."""
    context = context_length(model.config)
    room = context - len(ids)
    if room <= 0:
        raise LorafitError(f"prompt {index + 1} is {len(ids)} tokens, and the model's context holds {context}; "
                           "shorten the prompt")
    ends = end_tokens(model, tokenizer)
    options = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if sampling.temperature > 0:
        options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    echo = None if stream is None else _Echo(tokenizer, stream, index)
    torch.manual_seed(sampling.seed)  # per prompt: a prompt's completion does not depend on the ones before it
    inputs = torch.tensor([ids], device=model.device)
    output = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=min(sampling.max_new_tokens, room),
                            eos_token_id=ends, pad_token_id=tokenizer.pad_token_id, streamer=echo, **options)
    new = output[0, len(ids):].tolist()
    stop = "end token" if new and new[-1] in ends else "max_new_tokens" if len(new) == sampling.max_new_tokens else "context"
    return {"prompt": prompt, "completion": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": len(new),
            "stop": stop}


class _Echo(TextStreamer):
    """Hands each decoded piece of prompt `index`'s completion to `stream` (TextStreamer holds back half words)."""

    def __init__(self, tokenizer, stream: Stream, index: int):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream, self.index = stream, index

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream(self.index, text, stream_end)


def end_tokens(model, tokenizer) -> list[int]:
    """The tokenizer's eos and every end token the model's generation config names (e.g. a chat end-of-turn)."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({token for token in [tokenizer.eos_token_id, *configured] if token is not None})


def context_length(config) -> int:
    """Positions the model has: prompt plus completion must fit."""
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return 1 << 30  # no learned limit (e.g. ALiBi)


def read_prompts(path: Path) -> list[str | dict]:
    """Prompts from a file: a .jsonl of rows holding the recipe's input field, else one prompt per non-blank line."""
    input_file(path, "prompts file", "fix --prompts")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM that some editors write first is not part of a prompt
    except UnicodeDecodeError as error:
        raise LorafitError(f"prompts file {path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                           "give a text file of prompts") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise LorafitError(f"{path} row {number} is not valid JSON ({error.msg}); fix the row") from error
        if not isinstance(rows[-1], dict):
            raise LorafitError(f'{path} row {number} is not an object; write one {{"field": "..."}} per line')
    return rows
