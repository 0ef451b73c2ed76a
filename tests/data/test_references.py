"""Evaluation prompts for generation: rows with the same prompt are one prompt with all their references."""

from __future__ import annotations

import pytest
from conftest import TINY_MODEL, write_jsonl

from lorafit.data.prompts import prompt_ids
from lorafit.data.references import prompt_groups
from lorafit.data.tokenize import tokenize_eval
from lorafit.errors import LorafitError
from lorafit.model.load import load_tokenizer
from lorafit.recipe import DataSection

ROWS = [
    {"mr": "name[A], food[Thai]", "text": "A serves Thai food.", "refs": ["A serves Thai food.", "A is Thai."]},
    {"mr": "name[B]", "text": "B is a place.", "refs": ["B is a place."]},
    {"mr": "name[A], food[Thai]", "text": "There is Thai food at A.", "refs": ["There is Thai food at A."]},
    {"mr": "name[A], food[Thai]", "text": "A serves Thai food.", "refs": ["A serves Thai food."]},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TINY_MODEL))


def data_of(tmp_path, rows, **keys) -> DataSection:
    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)),
             "validation": str(write_jsonl(tmp_path / "validation.jsonl", rows))}
    return DataSection(source=files, task="completion", prompt_field="mr", response_field="text", template="{text} ||",
                       **keys)


def test_rows_with_the_same_prompt_are_one_prompt_with_all_their_references(tmp_path, tokenizer):
    data = data_of(tmp_path, ROWS)
    groups, unreferenced = prompt_groups(data, tokenizer, tokenize_eval(data, tokenizer))
    assert unreferenced == 0
    assert [g.prompt for g in groups] == ["name[A], food[Thai] ||", "name[B] ||"]
    assert [g.rows for g in groups] == [[0, 2, 3], [1]]
    assert groups[0].references == ["A serves Thai food.", "There is Thai food at A."]  # each reference once
    assert groups[1].ids == prompt_ids(data, tokenizer, ROWS[1])


def test_a_list_valued_references_field_gives_every_reference(tmp_path, tokenizer):
    data = data_of(tmp_path, ROWS)
    groups, _ = prompt_groups(data, tokenizer, tokenize_eval(data, tokenizer), references_field="refs")
    assert groups[0].references == ["A serves Thai food.", "A is Thai.", "There is Thai food at A."]
    assert groups[1].references == ["B is a place."]


def test_a_references_field_that_is_missing_or_not_a_list_of_texts_is_one_line(tmp_path, tokenizer):
    data = data_of(tmp_path, [{**row, "refs": 3} for row in ROWS])
    with pytest.raises(LorafitError, match="row 1: field 'refs' is 3, not a list of texts"):
        prompt_groups(data, tokenizer, tokenize_eval(data, tokenizer), references_field="refs")
    with pytest.raises(LorafitError, match="has no field 'refz'"):
        prompt_groups(data, tokenizer, tokenize_eval(data, tokenizer), references_field="refz")


def test_held_out_rows_and_max_eval_examples_are_the_rows_grouped(tmp_path, tokenizer):
    rows = [{"mr": f"name[{i % 7}]", "text": f"It is place {i}."} for i in range(40)]
    data = data_of(tmp_path, rows, eval_fraction=0.25)
    split = tokenize_eval(data, tokenizer)
    groups, _ = prompt_groups(data, tokenizer, split)
    held = sorted(set(split.examples["row"]))
    assert sorted(i for g in groups for i in g.rows) == held and len(held) == 10
    assert all(g.references == [f"It is place {i}." for i in g.rows] for g in groups)
    capped = data_of(tmp_path, rows, max_eval_examples=5)
    groups, _ = prompt_groups(capped, tokenizer, tokenize_eval(capped, tokenizer))
    assert [g.rows for g in groups] == [[0], [1], [2], [3], [4]]


def test_chat_references_are_the_final_assistant_turn_and_other_rows_are_counted(tmp_path, tokenizer):
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}"
                "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = [{"messages": talk}, {"messages": [*talk, {"role": "user", "content": "bye"}]}]
    files = {"validation": str(write_jsonl(tmp_path / "chat.jsonl", rows)), "train": str(tmp_path / "chat.jsonl")}
    data = DataSection(source=files, task="chat", chat_template=template)
    groups, unreferenced = prompt_groups(data, tokenizer, tokenize_eval(data, tokenizer))
    assert [(g.prompt, g.references) for g in groups] == [("user: hi\nassistant: ", ["hello"])]
    assert unreferenced == 1
