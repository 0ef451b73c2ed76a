"""Chat rows: messages rendered with a chat template, the loss on assistant turns and their end-of-turn token.

Where an assistant turn lies in the rendered text is found by rendering the conversation up to that turn (with
the template's opening of an assistant turn) and through it: the text in between is the turn. So any template
works that renders a conversation as its earlier turns followed by the new one, with no `{% generation %}` marks.
"""
from __future__ import annotations

from lorafit.errors import LorafitError
from lorafit.recipe import DataSection

TEMPLATE_FILE = "chat_template.jinja"  # the name transformers gives a tokenizer's template on disk


ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant",
         "tool": "tool"}  # OpenAI roles, and ShareGPT's "from" values


def chat_template(data: DataSection, tokenizer) -> str:
    """The template chat rows are rendered with: the recipe's [data] chat_template, else the tokenizer's."""
    template = data.chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # a tokenizer with several named templates
        template = template.get("default")
    if not template:
        raise LorafitError(
            "task = 'chat' needs a chat template and the tokenizer has none; give one as [data] chat_template "
            "(Jinja, as in a tokenizer_config.json)"
        )
    return template


def messages_of(value, where: str, index: int, field: str) -> list[dict]:
    """A row's messages as [{role, content}], from the OpenAI ({role, content}) or ShareGPT ({from, value}) shape."""
    if not isinstance(value, list):
        raise LorafitError(f"{where} row {index + 1}: field {field!r} is not a list of messages; fix the row or set "
                           "[data] messages_field")
    messages = []
    for number, message in enumerate(value, start=1):
        message = message if isinstance(message, dict) else {}
        role = message.get("role") if message.get("role") is not None else message.get("from")
        content = message.get("content") if message.get("content") is not None else message.get("value")
        if role not in ROLES or not isinstance(content, str):
            raise LorafitError(
                f"{where} row {index + 1}: message {number} of {field!r} is not {{role, content}} with text content "
                f"and a role of {', '.join(sorted(ROLES))}; fix the row"
            )
        messages.append({"role": ROLES[role], "content": content})
    return messages


def render(messages: list[dict], tokenizer, template: str, *, generation_prompt: bool = False,
           row: str = "a conversation") -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as error:  # jinja2 errors, and raise_exception() calls inside templates
        raise LorafitError(f"the chat template failed on {row}: {type(error).__name__}: {error}; "
                           "fix [data] chat_template or the row") from error


def assistant_spans(messages: list[dict], tokenizer, template: str, last_only: bool,
                    row: str = "a conversation") -> tuple[str, list[tuple]]:
    """(the rendered conversation, the character span of each supervised assistant turn: from its content to the
    end of the turn's rendering). `row` names the conversation in errors ("train.jsonl row 3")."""
    text = render(messages, tokenizer, template, row=row)
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    turns = turns[-1:] if last_only else turns
    if turns and turns[0] == 0:  # no earlier turn to render as this turn's prompt
        raise LorafitError(f"{row}: the conversation starts with the assistant, so its first turn answers nothing; "
                           "start it with a user (or system) message, or drop the row")
    spans = []
    for turn in turns:
        start = len(render(messages[:turn], tokenizer, template, generation_prompt=True, row=row))
        through = render(messages[: turn + 1], tokenizer, template, row=row)
        if not text.startswith(through) or len(through) < start:
            raise LorafitError("the chat template does not render a conversation as its earlier turns followed by "
                               "the new one, so assistant turns cannot be located; give [data] chat_template")
        spans.append((start, len(through)))
    return text, spans


def turn_mask(ids: list[int], offsets: list[tuple], spans: list[tuple], special: set[int]) -> list[bool]:
    """Which tokens carry loss: in each span, the tokens up to and including the first special token (the turn's
    end-of-turn token; what follows it, such as a newline, is the template's and carries none)."""
    supervised = [False] * len(ids)
    for start, end in spans:
        # a token that begins before the content but runs into it (" It" after "assistant:") is the content's
        inside = [j for j, (begin, finish) in enumerate(offsets) if begin < end and finish > start]
        stop = next((j for j in inside if ids[j] in special), None)
        if stop is None:
            raise LorafitError("the chat template ends an assistant turn without a special end-of-turn token, so "
                               "the model would not learn to stop; end turns with one (e.g. {{ eos_token }})")
        for j in inside:
            if j > stop:
                break
            supervised[j] = True
    return supervised


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens, the added ones marked special included."""
    added = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return set(tokenizer.all_special_ids) | added


def end_of_turn_token(tokenizer, template: str) -> int | None:
    """The special token `template` closes an assistant turn with, at which generation must stop; None if none."""
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}]
    try:
        text, spans = assistant_spans(messages, tokenizer, template, last_only=True)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = turn_mask(encoded["input_ids"], encoded["offset_mapping"], spans, special_ids(tokenizer))
    except LorafitError:
        return None
    return encoded["input_ids"][max(i for i, supervised in enumerate(mask) if supervised)]
