"""Fitting rows to max_length without losing what is supervised: the rules for each task, and their counts.

Classification shortens the row's text inside the template (the template's tail and the label stay);
completion and chat drop prompt tokens from the left (a leading bos stays) and cut a response only when it
cannot fit; a long document becomes several windows so that every token is still predicted.
"""
from __future__ import annotations

from collections.abc import Callable

KEPT, SHORTENED, CUT = 0, 1, 2  # a row as it was; its prompt or text shortened; supervised tokens cut off


ROUNDS = 32  # attempts to shorten a template's fields: each cuts at least one token


def shorten_fields(render: Callable[[dict[str, str]], list[int]], values: dict[str, str], budget: int,
                   tokenizer) -> tuple[list[int] | None, bool]:
    """(prompt ids within `budget` tokens, whether a field was shortened), or (None, True) when even empty fields
    leave the template too long. The field with the most tokens loses tokens from its end, round by round."""
    ids = render(values)
    if len(ids) <= budget:
        return ids, False
    values = dict(values)
    for _ in range(ROUNDS):
        tokens = {name: tokenizer(value, add_special_tokens=False)["input_ids"] for name, value in values.items()}
        name = max(tokens, key=lambda key: len(tokens[key]))
        field = tokens[name]
        if not field:
            return None, True
        keep = max(0, min(len(field) - (len(ids) - budget), len(field) - 1))
        # decoding a prefix of byte-level tokens may end inside a character: drop that half character
        values[name] = tokenizer.decode(field[:keep], clean_up_tokenization_spaces=False).rstrip("\ufffd")
        ids = render(values)
        if len(ids) <= budget:
            return ids, True
    return None, True


def fit_from_left(ids: list[int], supervised: list[bool], max_length: int, keep: int) -> tuple[list[int], list[bool]]:
    """The row within max_length: the first `keep` tokens (a bos) stay, then prompt tokens go from the left; when
    the last supervised stretch (the response) and one token of context do not fit, it is cut from the right."""
    if len(ids) <= max_length:
        return ids, supervised
    last = max((i for i, flag in enumerate(supervised) if flag), default=len(ids))
    while last > 0 and supervised[last - 1]:
        last -= 1  # the start of the last supervised stretch
    room = max_length - keep
    start = len(ids) - room if len(ids) - last + 1 <= room else max(last - 1, keep)
    return ids[:keep] + ids[start : start + room], supervised[:keep] + supervised[start : start + room]


def windows(ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], list[bool]]]:
    """A document as windows of max_length tokens. Each window after the first repeats the last max(stride, 1)
    tokens before it as context without loss, so every token but the first is predicted exactly once."""
    context = max(stride, 1)
    out = [(ids[:max_length], [True] * min(len(ids), max_length))]
    start = max_length  # the first token no window has predicted yet
    while start < len(ids):
        begin = start - context
        chunk = ids[begin : begin + max_length]
        out.append((chunk, [False] * context + [True] * (len(chunk) - context)))
        start = begin + max_length
    return out


def predicted(supervised: list[bool]) -> int:
    """Supervised tokens that are predicted: all but a row's first token, which nothing comes before."""
    return sum(supervised[1:])
