"""Property: any jsonl file gives either a clean one-line LorafitError or well-formed batches, never a crash."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from conftest import EOS  # noqa: E402
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafit.data.batches import collate
from lorafit.data.tasks import IGNORE
from lorafit.data.tokenize import tokenize_split
from lorafit.errors import LorafitError
from lorafit.recipe import DataSection

LABELS = ["negative", "positive"]
FIELDS = {"classification": ("text", "label"), "completion": ("prompt", "response"), "text": ("text",)}
ODD_TEXT = [
    "", " ", "\x00", "e\u0301\u0301", "👍🏽👩‍👩‍👧", "مرحبا بالعالم", "\u202eevil\u202c",
    "\u2028\u2029", "\ufeff", "\U0010fffd", "{text}", "{}", EOS, "a\r\nb\tc", "word " * 300,
]
MISSING = object()


texts = st.one_of(
    st.sampled_from(ODD_TEXT),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=40),
    st.text(st.characters(exclude_categories=("Cs",)), min_size=200, max_size=600),
)
values = st.one_of(
    texts, texts, texts,
    st.none(), st.integers(-3, 3), st.integers(2**63, 2**70), st.floats(allow_nan=True), st.booleans(),
    st.lists(st.integers(), max_size=2), st.just(MISSING),
)
labels = st.one_of(
    st.integers(-1, 2), st.sampled_from(LABELS + ["neutral", ""]), st.floats(0, 2), st.none(), st.just(MISSING)
)


@st.composite
def jsonl_files(draw) -> tuple[str, list[str], bool]:
    """A task, the lines of a jsonl file for it, and whether every row is plainly valid.

    About half the files are plainly valid (odd text, good labels); the rest mix in bad values and lines.
    """
    task = draw(st.sampled_from(sorted(FIELDS)))
    corrupt = draw(st.booleans())
    label_words = draw(st.booleans())
    good_label = st.sampled_from(LABELS) if label_words else st.integers(0, len(LABELS) - 1)
    lines, clean = [], True
    for _ in range(draw(st.integers(0 if corrupt else 1, 6))):
        if corrupt and draw(st.integers(0, 9)) == 0:
            lines.append(draw(st.sampled_from(["{not json", "[1, 2]", "42", '"text"'])))
            clean = False
            continue
        row = {}
        for field in FIELDS[task]:
            good = good_label if field == "label" else texts
            value = draw(st.one_of(good, good, good, labels if field == "label" else values) if corrupt else good)
            clean &= isinstance(value, str) if field != "label" else _plain_label(value, label_words)
            if value is not MISSING:
                row[field] = value
        lines.append(json.dumps(row, ensure_ascii=False))
    return task, lines, clean and bool(lines)


def _plain_label(value, label_words: bool) -> bool:
    if label_words:
        return value in LABELS
    return type(value) is int and 0 <= value < len(LABELS)


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=jsonl_files(), max_length=st.integers(2, 48), template=st.sampled_from(["{text}", "Q: {text}\nA:"]))
def test_any_jsonl_gives_a_clean_error_or_well_formed_batches(tokenizer, case, max_length, template):
    task, lines, clean = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.jsonl"
        path.write_text("\n".join(lines), encoding="utf-8")
        data = DataSection(source=str(path), task=task, text_field="text", label_field="label", labels=LABELS,
                           template=template, max_length=max_length)
        try:
            split = tokenize_split(data, tokenizer, "train")
        except LorafitError as error:
            assert "\n" not in str(error)
            # a file of plainly valid rows fails only when max_length cuts off every row's supervised tokens
            # plainly valid rows fail only when max_length leaves no room for a template and label, or when every
            # row is an empty document
            assert not clean or "max_length" in str(error) or "anything to predict" in str(error), str(error)
            return
    assert split.total == len(lines)
    rows = list(split.examples)
    assert split.dropped + len({row["row"] for row in rows}) == split.total
    for row in rows:
        assert_well_formed(row, max_length)
    if clean:
        assert_fitted(tokenizer, task, [json.loads(line) for line in lines], template, max_length, rows)
    batch = collate(rows, tokenizer.pad_token_id)
    lengths = [len(row["input_ids"]) for row in rows]
    assert batch["input_ids"].shape == (len(rows), max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert ((batch["labels"] == IGNORE) | (batch["labels"] == batch["input_ids"])).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def assert_well_formed(row: dict, max_length: int) -> None:
    """Labels align with input_ids; the supervised part is non-empty and is everything after the prompt."""
    input_ids, labels, prompt_len = row["input_ids"], row["labels"], row["prompt_len"]
    assert 0 < len(input_ids) <= max_length and len(labels) == len(input_ids)
    assert labels[:prompt_len] == [IGNORE] * prompt_len
    assert labels[prompt_len:] == input_ids[prompt_len:] and len(labels) > prompt_len


def assert_fitted(tokenizer, task: str, rows: list[dict], template: str, max_length: int, examples: list[dict]) -> None:
    """Each row's examples, checked against ids built here from the tokenizer alone: a row that fits is as it was;
    a classification row keeps its label and its template's tail; a completion row keeps its response's start and a
    suffix of its prompt; a document's windows give back every token; only an empty document has no example."""
    eos = tokenizer.eos_token_id
    by_row = {}
    for example in examples:
        by_row.setdefault(example["row"], []).append(example)
    for index, row in enumerate(rows):
        found = by_row.get(index, [])
        if task == "text":
            document = tokenizer(template.replace("{text}", row["text"]))["input_ids"] + [eos]
            if not template.replace("{text}", row["text"]):
                assert not found
                continue
            rebuilt = found[0]["input_ids"] + [t for window in found[1:] for t in window["input_ids"][1:]]
            assert rebuilt == document
            continue
        (example,) = found
        text = row["text"] if task == "classification" else row["prompt"]
        prompt = tokenizer(template.replace("{text}", text))["input_ids"] or [eos]
        if task == "classification":
            word = row["label"] if isinstance(row["label"], str) else LABELS[row["label"]]
            target = tokenizer(" " + word)["input_ids"]
        else:
            target = tokenizer(row["response"])["input_ids"] + [eos]
        ids, kept = example["input_ids"], example["prompt_len"]
        if len(prompt) + len(target) <= max_length:
            assert ids == prompt + target
        elif task == "classification":
            tail = tokenizer(template.split("{text}")[1])["input_ids"] if template.split("{text}")[1] else []
            assert ids[kept:] == target and ids[:kept][len(ids[:kept]) - len(tail):] == tail
        else:
            assert ids[:kept] == prompt[len(prompt) - kept:]
            assert ids[kept:] == target[: len(ids) - kept] and len(ids) == max_length
