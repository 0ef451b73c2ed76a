"""`lorafit generate`: try an adapter (or a merged model) on prompts, formatted exactly as training formatted them.

Completion and text recipes continue the prompt (greedy, sampled with temperature and top-p, or beam search: the
recipe's [eval] decoding with the options on top) until an end token or a stop string, streaming the text as it
comes; classification recipes score each label word after the prompt, as `lorafit eval` does, and give the most
likely label and its probability among the labels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TextStreamer

from lorafit.data import prompts
from lorafit.data.chat import TEMPLATE_FILE
from lorafit.data.tasks import label_token_ids
from lorafit.errors import LorafitError
from lorafit.evaluate import checked_source, inference_model, label_logprobs
from lorafit.generation.decoding import END_TOKEN, Decoding, decode, held_back, room
from lorafit.messages import note
from lorafit.model.loss import SupervisedLoss
from lorafit.recipe import DataSection, Recipe
from lorafit.storage import input_file

# Called with (prompt index, text, done): pieces of a completion as they are decoded; done on its last call.
Stream = Callable[[int, str, bool], None]


def generate(recipe: Recipe, prompts: list[str | dict], *, adapter: Path | None = None, model_dir: Path | None = None,
             decoding: Decoding | None = None, stream: Stream | None = None) -> list[dict]:
    """One result per prompt: {prompt, completion, new_tokens, stop} or, for classification, {prompt, label,
    probability, probabilities}. A prompt is text for the recipe's input field, or a row holding that field.
    `decoding` defaults to the recipe's (recipe_decoding)."""
    from lorafit.model.load import load_tokenizer

    if not prompts:
        raise LorafitError('no prompt given; pass one or more PROMPT arguments or --prompts FILE')
    decoding = decoding or recipe_decoding(recipe)
    if not math.isfinite(decoding.temperature):
        raise LorafitError(f"--temperature {decoding.temperature} is not a finite number; give e.g. 0.7 (0 is greedy)")
    name = checked_source(recipe, adapter, model_dir)
    tokenizer = load_tokenizer(name, trust_remote_code=recipe.model.trust_remote_code)
    saved = Path(adapter) / TEMPLATE_FILE if adapter is not None else None
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
        results = [complete(model, tokenizer, prompt, ids, decoding, index, stream)
                   for index, (prompt, ids) in enumerate(zip(prompts, encoded))]
    for number, result in enumerate(results, start=1):
        if why := empty_reason(result):
            note(f"prompt {number}'s completion is empty: {why}")
    return results


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
    if result["stop"] == END_TOKEN and result["new_tokens"] == 1:
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
def complete(model, tokenizer, prompt, ids: list[int], decoding: Decoding, index: int = 0,
             stream: Stream | None = None) -> dict:
    """Continue one prompt until an end token, a stop string, max_new_tokens, or the end of the model's context;
    greedy and sampled text is streamed as it comes, beam search's when the search is done."""
    space = room(model, len(ids))
    if space is not None and space <= 0:
        raise LorafitError(f"prompt {index + 1} is {len(ids)} tokens, and the model's context holds "
                           f"{len(ids) + space}; shorten the prompt")
    echo = None if stream is None or decoding.num_beams > 1 else _Echo(tokenizer, stream, index, decoding.stop)
    torch.manual_seed(decoding.seed)  # per prompt: a prompt's completion does not depend on the ones before it
    [done] = decode(model, tokenizer, [ids], decoding, streamer=echo)
    if stream is not None and echo is None:
        stream(index, done.text, True)
    return {"prompt": prompt, "completion": done.text, "new_tokens": len(done.ids), "stop": done.stop}


class _Echo(TextStreamer):
    """Hands each decoded piece of prompt `index`'s completion to `stream` (TextStreamer holds back half words;
    this holds back what may be the start of a stop string, and drops the stop string and all after it)."""

    def __init__(self, tokenizer, stream: Stream, index: int, stop: tuple[str, ...] = ()):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream, self.index, self.stop = stream, index, stop
        self.text, self.shown, self.done = "", 0, False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.done:
            return
        self.text += text
        visible, found = held_back(self.text, self.stop)
        self.done = found or stream_end
        if stream_end and not found:
            visible = self.text
        piece, self.shown = visible[self.shown:], len(visible)
        if piece or self.done:
            self.stream(self.index, piece, self.done)


def recipe_decoding(recipe: Recipe, **given) -> Decoding:
    """The recipe's [eval] decoding with the options given (not None) on top; max_new_tokens is 128 unless the
    recipe's [eval] or an option sets it."""
    defaults = {} if "max_new_tokens" in recipe.eval.model_fields_set else {"max_new_tokens": 128}
    return Decoding.of(recipe.eval, **{**defaults, **{key: value for key, value in given.items() if value is not None}})


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
