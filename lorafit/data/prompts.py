"""Prompts: the recipe's template filled from a row's fields, or a row's messages rendered with the chat template.

A prompt is what the model reads before the text it learns to produce. Training builds its rows from these
functions, and `prompt_ids` gives `lorafit generate` the very tokens a trained row started with.
"""
from __future__ import annotations

import string

from lorafit.errors import LorafitError
from lorafit.recipe import DataSection

DEFAULT_TEMPLATE = "{text}"


def template_fields(data: DataSection) -> dict[str, str]:
    """{placeholder: row field} of [data] template: {text} is text_field (prompt_field for completion), any other
    {name} is the row's field of that name. Literal braces are written {{ and }}."""
    if data.task == "chat":  # the chat template formats the rows (a recipe refuses a [data] template beside it)
        return {}
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(data.template) if name is not None]
    except ValueError as error:
        raise LorafitError(
            f"[data] template {data.template!r} is not a valid template ({error}); write literal braces as {{{{ and }}}}"
        ) from error
    for name in names:
        if not name.isidentifier():
            raise LorafitError(
                f"[data] template has {{{name}}}, which is not a field name; name a field such as {{text}} "
                "or write a literal brace as {{ or }}"
            )
    if not names:
        raise LorafitError(
            f"[data] template must contain {{text}} or another {{field}} of the row (got {data.template!r}); "
            'e.g. template = "Review: {text}\\nSentiment:"'
        )
    text_field = data.prompt_field if data.task == "completion" else data.text_field
    return {name: text_field if name == "text" else name for name in dict.fromkeys(names)}


def fill_template(data: DataSection, values: dict[str, str]) -> str:
    """The template with each {placeholder} replaced by its value."""
    return data.template.format_map(values)


def template_values(data: DataSection, row: dict) -> dict[str, str]:
    """{placeholder: text} read from a row (field values are checked to be text when rows are loaded)."""
    return {name: row[field] for name, field in template_fields(data).items()}


def render_prompt(data: DataSection, tokenizer, row: str | dict) -> str:
    """The prompt text of a row, without its response: the filled template, or the conversation so far followed by
    the chat template's opening of an assistant turn. A plain string is the {text} field (chat: one user message)."""
    from lorafit.data.chat import chat_template, messages_of, render

    row = prompt_row(data, row) if isinstance(row, str) else row
    if data.task != "chat":
        return fill_template(data, template_values(data, row))
    messages = messages_of(row[data.messages_field], "the prompt", 0, data.messages_field)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # the turn to produce
    return render(messages, tokenizer, chat_template(data, tokenizer), generation_prompt=True)


def prompt_ids(data: DataSection, tokenizer, row: str | dict) -> list[int]:
    """The prompt's token ids exactly as a training row starts: template prompts with the tokenizer's special
    tokens (an empty one as bos), chat prompts as the template writes them."""
    text = render_prompt(data, tokenizer, row)
    if data.task == "chat":
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text, add_special_tokens=True)["input_ids"] or [start_id(tokenizer)]


def prompt_row(data: DataSection, text: str) -> dict:
    """A row of plain `text`: the template's main field (`main_field`) holds it and its other fields are empty;
    for chat, one user message."""
    if data.task == "chat":
        return {data.messages_field: [{"role": "user", "content": text}]}
    main = main_field(data)
    return {field: text if name == main else "" for name, field in template_fields(data).items()}


def main_field(data: DataSection) -> str:
    """The placeholder that a prompt given as plain text fills: {text}, else the template's first {field}."""
    fields = template_fields(data)
    return "text" if "text" in fields else next(iter(fields))


def start_id(tokenizer) -> int:
    """An empty prompt starts with bos (or eos, GPT-2's start token) so the first target token has a context."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise LorafitError(
            "a row's prompt is empty and the tokenizer has no bos/eos token to start it; set [data] template"
        )
    return start
