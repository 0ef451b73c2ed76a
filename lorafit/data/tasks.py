"""Each task's rows -> examples: input_ids, labels (IGNORE where no loss), prompt_len, and how max_length fitted it.

A batch of rows is tokenized in one call (a call per row costs about a millisecond in transformers); only the
rows that do not fit go through `lorafit.data.truncation` one by one.
"""
from __future__ import annotations

from lorafit.data.chat import assistant_spans, chat_template, special_ids, turn_mask
from lorafit.data.prompts import fill_template, start_id, template_fields
from lorafit.data.truncation import CUT, KEPT, SHORTENED, fit_from_left, predicted, shorten_fields, windows
from lorafit.errors import LorafitError
from lorafit.recipe import DataSection

IGNORE = -100  # the label of a position with no loss: the ignore_index of torch and transformers losses


def label_token_ids(data: DataSection, tokenizer) -> list[list[int]]:
    """Token ids of " <label word>" for each label, exactly as they are appended after the prompt."""
    if not data.labels:
        raise LorafitError(
            '[data] labels is empty; classification needs the label words, e.g. labels = ["negative", "positive"]'
        )
    ids = _encode(tokenizer, [" " + word for word in data.labels], special=False)
    seen: dict[tuple[int, ...], str] = {}
    for word, tokens in zip(data.labels, ids):
        if not tokens:
            raise LorafitError(f"[data] label {word!r} tokenizes to no tokens; use a label word")
        if tuple(tokens) in seen:
            raise LorafitError(
                f"[data] labels {seen[tuple(tokens)]!r} and {word!r} tokenize to the same ids {tokens}; "
                "use distinct label words"
            )
        seen[tuple(tokens)] = word
    return ids


def encoder(data: DataSection, tokenizer):
    """The task's `encode(rows, indices, where)` -> examples: one per row, several for a long document, none for
    a row with nothing to predict. Recipe-level problems are raised here, before any row is read."""
    if data.task in ("completion", "text") and tokenizer.eos_token_id is None:
        raise LorafitError(
            f"the tokenizer has no eos token, which the {data.task} task appends to each row; use one that has"
        )
    names = template_fields(data)
    max_length = data.max_length

    def prompts(rows: list[dict]) -> list[str]:
        return [fill_template(data, {name: row[field] for name, field in names.items()}) for row in rows]

    def fitted(index: int, ids: list[int], supervised: list[bool]) -> dict:
        """A completion or chat row fitted from the left; its prompt is all before the first supervised token."""
        keep = int(len(ids) > 1 and ids[0] == tokenizer.bos_token_id)
        kept_ids, kept = fit_from_left(ids, supervised, max_length, keep)
        lost = predicted(supervised) - predicted(kept)
        fit = KEPT if kept_ids is ids else CUT if lost else SHORTENED
        return example(index, kept_ids, kept, kept.index(True) if True in kept else len(kept), fit, lost)

    if data.task == "classification":
        label_ids = label_token_ids(data, tokenizer)
        longest = max(len(ids) for ids in label_ids)
        if longest + 1 > max_length:
            raise LorafitError(f"[data] max_length = {max_length} leaves no room for a prompt before the "
                               f"{longest}-token label; raise max_length")

        def render(values: dict[str, str]) -> list[int]:
            return _encode(tokenizer, [fill_template(data, values)], special=True)[0] or [start_id(tokenizer)]

        def encode(rows, indices, where):
            out = []
            for row, index, prompt in zip(rows, indices, _encode(tokenizer, prompts(rows), special=True)):
                label, prompt = row[data.label_field], prompt or [start_id(tokenizer)]
                target, fit = label_ids[label], KEPT
                if len(prompt) + len(target) > max_length:
                    values = {name: row[field] for name, field in names.items()}
                    prompt, _ = shorten_fields(render, values, max_length - len(target), tokenizer)
                    if prompt is None:
                        raise LorafitError(f"{where} row {index + 1}: the template and label alone are longer than "
                                           f"[data] max_length = {max_length}; raise max_length or shorten the template")
                    fit = SHORTENED
                out.append({**example(index, prompt + target, [False] * len(prompt) + [True] * len(target),
                                      len(prompt), fit), "label_index": label})
            return out

    elif data.task == "completion":
        def encode(rows, indices, where):
            responses = _encode(tokenizer, [row[data.response_field] for row in rows], special=False)
            out = []
            for index, prompt, response in zip(indices, _encode(tokenizer, prompts(rows), special=True), responses):
                prompt, target = prompt or [start_id(tokenizer)], response + [tokenizer.eos_token_id]
                out.append(fitted(index, prompt + target, [False] * len(prompt) + [True] * len(target)))
            return out

    elif data.task == "chat":
        template, last_only, special = chat_template(data, tokenizer), data.assistant_turns == "last", special_ids(tokenizer)

        def encode(rows, indices, where):
            rendered = [assistant_spans(row[data.messages_field], tokenizer, template, last_only,
                                        row=f"{where} row {index + 1}") for row, index in zip(rows, indices)]
            encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
            out = []
            for index, (_, spans), ids, offsets in zip(indices, rendered, encoded["input_ids"],
                                                       encoded["offset_mapping"]):
                supervised = turn_mask(ids, offsets, spans, special)
                if predicted(supervised):  # a conversation without an assistant turn has nothing to predict
                    out.append(fitted(index, ids, supervised))
            return out

    else:  # [data] stride < max_length - 1, as the recipe requires
        def encode(rows, indices, where):
            texts = prompts(rows)
            out = []
            for index, text, ids in zip(indices, texts, _encode(tokenizer, texts, special=True)):
                if not text:
                    continue  # an empty document: nothing to predict
                for number, (window, supervised) in enumerate(windows(ids + [tokenizer.eos_token_id], max_length,
                                                                      data.stride)):
                    out.append(example(index, window, supervised, supervised.index(True) if number else 0))
            return out

    return encode


def example(index: int, ids: list[int], supervised: list[bool], prompt_len: int, fit: int = KEPT, lost: int = 0):
    labels = [token if flag else IGNORE for token, flag in zip(ids, supervised)]
    return {"input_ids": ids, "labels": labels, "prompt_len": prompt_len, "row": index, "fit": fit, "lost": lost}


def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special)["input_ids"]
