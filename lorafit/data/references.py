"""The prompts of an evaluation split for generation, each with all of its references.

Data-to-text sets such as E2E give several human references per input, one row each: rows whose prompts are the
same text are one prompt, and its references are all of theirs. A field listing the references of a row (e.g.
GEM's `references`) can be read instead of the response.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lorafit.data.chat import messages_of
from lorafit.data.files import short_repr
from lorafit.data.prompts import prompt_ids, render_prompt
from lorafit.data.rows import HELD_OUT, describe_split, load_rows
from lorafit.errors import LorafitError
from lorafit.recipe import DataSection


@dataclass
class PromptGroup:
    """One distinct prompt: its text, its tokens exactly as training rows start, every reference, its rows."""

    prompt: str
    ids: list[int]
    references: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)


def prompt_groups(data: DataSection, tokenizer, split, references_field: str = "") -> tuple[list[PromptGroup], int]:
    """(the distinct prompts of `split`'s rows in order of first appearance, rows left out for lack of a reference).

    `split` is the tokenized evaluation split (lorafit.data.tokenize.TokenizedSplit): its rows are the ones read
    (eval_fraction's held-out rows, max_eval_examples), less those it left out with nothing to predict.
    """
    held_out = split.name == HELD_OUT
    name = data.train_split if held_out else split.name
    rows = load_rows(data, name, evaluation=not held_out)
    where = describe_split(data, split.name)
    if references_field and references_field not in rows.column_names:
        raise LorafitError(f"{where} has no field {references_field!r} (fields: {', '.join(rows.column_names)}); "
                           "fix [eval] references_field")
    groups: dict[str, PromptGroup] = {}
    unreferenced = 0
    for index in sorted(set(split.examples["row"])):
        row = rows[index]
        references = _references(data, row, references_field, where, index)
        if not references:
            unreferenced += 1
            continue
        text = render_prompt(data, tokenizer, row)
        if text not in groups:
            groups[text] = PromptGroup(text, prompt_ids(data, tokenizer, row))
        group = groups[text]
        group.rows.append(index)
        group.references.extend(ref for ref in references if ref not in group.references)
    return list(groups.values()), unreferenced


def _references(data: DataSection, row: dict, references_field: str, where: str, index: int) -> list[str]:
    """A row's references: the list in `references_field`, else its response (chat: the final assistant turn;
    none when the conversation does not end with one)."""
    if references_field:
        value = row[references_field]
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(ref, str) for ref in value):
            raise LorafitError(f"{where} row {index + 1}: field {references_field!r} is {short_repr(value)}, not a "
                               "list of texts; fix the row or [eval] references_field")
        return value
    if data.task == "completion":
        return [row[data.response_field]]
    messages = messages_of(row[data.messages_field], where, index, data.messages_field)
    return [messages[-1]["content"]] if messages and messages[-1]["role"] == "assistant" else []
