"""Data path: loss positions per task, truncation, padding, bad input, and length-grouped batches.

Expected token ids always come straight from the tokenizer on the prompt text built here by hand,
never from lorafit's own output.
"""

from __future__ import annotations

import csv
import json
import random

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_jsonl

from lorafit.data.batches import collate, supervised_count
from lorafit.data.plan import length_grouped_batches
from lorafit.data.rows import load_rows
from lorafit.data.tasks import IGNORE, label_token_ids
from lorafit.data.tokenize import tokenize_eval, tokenize_split
from lorafit.errors import LorafitError
from lorafit.recipe import DataSection

TEMPLATE = "Review: {text}\nSentiment:"


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """Keep datasets' arrow cache out of the home folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def classification(source, **overrides) -> DataSection:
    settings = {"source": source, "task": "classification", "text_field": "text", "label_field": "label",
                "labels": ["negative", "positive"], "template": TEMPLATE, "max_length": 64}
    return DataSection(**{**settings, **overrides})


def error_of(call) -> str:
    with pytest.raises(LorafitError) as caught:
        call()
    return str(caught.value)


REVIEWS = [
    {"text": "the film was good", "label": 1},
    {"text": "I hated it", "label": 0},
    {"text": "a very dull plot and bad acting", "label": 0},
    {"text": "", "label": 1},
]


# --------------------------------------------------------------------------- loss positions per task


def test_classification_supervises_exactly_the_label_tokens(tmp_path, tokenizer):
    labels = ["negative", "positive", "zqxjv"]  # the last is unknown to the BPE, so it spans several tokens
    rows = REVIEWS + [{"text": "the story", "label": 2}]
    data = classification(str(write_jsonl(tmp_path / "train.jsonl", rows)), labels=labels)
    split = tokenize_split(data, tokenizer, "train")
    assert len(ids(tokenizer, " zqxjv")) > 1
    assert (split.total, split.dropped, len(split.examples)) == (5, 0, 5)
    for row, example in zip(rows, split.examples):
        word = labels[row["label"]]
        prompt = ids(tokenizer, TEMPLATE.replace("{text}", row["text"]))
        target = ids(tokenizer, " " + word)
        assert example["input_ids"] == prompt + target
        assert example["labels"] == [IGNORE] * len(prompt) + target
        assert example["prompt_len"] == len(prompt)
        assert example["label_index"] == labels.index(word)


def test_label_as_index_and_as_word_give_the_same_examples(tmp_path, tokenizer):
    as_index = write_jsonl(tmp_path / "index.jsonl", [{"text": "the plot", "label": 1}, {"text": "dull", "label": 0}])
    as_word = write_jsonl(
        tmp_path / "word.jsonl", [{"text": "the plot", "label": "positive"}, {"text": "dull", "label": "negative"}]
    )
    by_index = tokenize_split(classification(str(as_index)), tokenizer, "train").examples
    by_word = tokenize_split(classification(str(as_word)), tokenizer, "train").examples
    assert list(by_index) == list(by_word)
    assert by_word["label_index"] == [1, 0]


def test_classification_with_empty_prompt_starts_from_eos(tmp_path, tokenizer):
    data = classification(str(write_jsonl(tmp_path / "train.jsonl", [{"text": "", "label": 0}])), template="{text}")
    example = tokenize_split(data, tokenizer, "train").examples[0]
    target = ids(tokenizer, " negative")
    assert example["input_ids"] == [tokenizer.eos_token_id] + target
    assert example["labels"] == [IGNORE] + target
    assert example["prompt_len"] == 1


def test_label_token_ids_are_the_label_words_after_a_space(tokenizer):
    data = classification("x.jsonl", labels=["negative", "positive", "good"])
    assert label_token_ids(data, tokenizer) == [ids(tokenizer, " " + word) for word in ["negative", "positive", "good"]]


def test_completion_supervises_response_and_eos(tmp_path, tokenizer):
    rows = [{"prompt": "question: the film", "response": " answer: good"}, {"prompt": "question", "response": ""}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = DataSection(source=str(path), task="completion", template="Q: {text}\nA:")
    split = tokenize_split(data, tokenizer, "train")
    assert "label_index" not in split.examples.column_names
    for row, example in zip(rows, split.examples):
        prompt = ids(tokenizer, "Q: " + row["prompt"] + "\nA:")
        response = ids(tokenizer, row["response"]) + [tokenizer.eos_token_id]
        assert example["input_ids"] == prompt + response
        assert example["labels"] == [IGNORE] * len(prompt) + response
        assert example["prompt_len"] == len(prompt)


def test_text_supervises_every_token_and_leaves_out_empty_rows(tmp_path, tokenizer):
    rows = [{"text": "I loved the story."}, {"text": ""}]
    data = DataSection(source=str(write_jsonl(tmp_path / "train.jsonl", rows)), task="text", text_field="text")
    split = tokenize_split(data, tokenizer, "train")
    expected = [ids(tokenizer, "I loved the story.") + [tokenizer.eos_token_id]]
    assert split.examples["input_ids"] == expected
    assert split.examples["labels"] == expected
    assert split.examples["prompt_len"] == [0]
    assert (split.total, split.dropped) == (2, 1)  # an empty row would train to a loss of zero: left out, counted
    assert "1 with nothing to predict left out" in split.note()


# --------------------------------------------------------------------------- truncation


def test_long_classification_row_keeps_its_label_and_template_tail(tmp_path, tokenizer):
    long_text = " ".join(["the film was very good and the acting was great"] * 6)
    rows = [{"text": "good", "label": 1}, {"text": long_text, "label": 0}]
    short_prompt = ids(tokenizer, TEMPLATE.replace("{text}", "good"))
    max_length = len(short_prompt) + 6
    data = classification(str(write_jsonl(tmp_path / "train.jsonl", rows)), max_length=max_length)
    split = tokenize_split(data, tokenizer, "train")
    assert (split.total, split.dropped, split.shortened) == (2, 0, 1)
    assert split.examples[0]["input_ids"] == short_prompt + ids(tokenizer, " positive")
    long_row = split.examples[1]
    assert len(long_row["input_ids"]) <= max_length and long_row["label_index"] == 0
    # the text was shortened from its end inside the template: its start, the template's tail and the label remain
    kept = tokenizer.decode(long_row["input_ids"])
    assert kept.startswith("Review: the film was") and kept.endswith("\nSentiment: negative")
    assert long_row["labels"] == [IGNORE] * long_row["prompt_len"] + ids(tokenizer, " negative")


def test_multi_token_label_is_kept_whole(tmp_path, tokenizer):
    labels = ["negative", "zqxjv"]
    target = ids(tokenizer, " zqxjv")
    assert len(target) > 1
    prompt = ids(tokenizer, TEMPLATE.replace("{text}", "the film was good"))
    data = classification(str(write_jsonl(tmp_path / "train.jsonl", [{"text": "the film was good", "label": 1}])),
                          labels=labels, max_length=len(prompt) + len(target) - 2)
    example = tokenize_split(data, tokenizer, "train").examples[0]
    assert len(example["input_ids"]) <= len(prompt) + len(target) - 2
    assert example["input_ids"][-len(target):] == target
    assert example["labels"] == [IGNORE] * example["prompt_len"] + target


@pytest.mark.parametrize("stride", [0, 1, 3])
def test_long_document_becomes_windows_that_predict_every_token_once(tmp_path, tokenizer, stride):
    text = "the film was good but the plot was dull and the acting was bad and I hated it"
    data = DataSection(source=str(write_jsonl(tmp_path / "train.jsonl", [{"text": text}])), task="text",
                       text_field="text", max_length=6, stride=stride)
    split = tokenize_split(data, tokenizer, "train")
    document = ids(tokenizer, text) + [tokenizer.eos_token_id]
    predicted = []  # (position in the document, token) of every supervised, predicted token
    start = 0
    for number, example in enumerate(split.examples):
        assert len(example["input_ids"]) <= 6
        context = 0 if number == 0 else max(stride, 1)
        # each window is a stretch of the document, starting `context` tokens before the first new one
        assert example["input_ids"] == document[start - context : start - context + len(example["input_ids"])]
        assert example["labels"][:context] == [IGNORE] * context
        for offset, label in enumerate(example["labels"]):
            if label != IGNORE and offset > 0:
                predicted.append((start - context + offset, label))
        start = start - context + len(example["input_ids"])
    assert predicted == list(enumerate(document))[1:]  # every token but the first, each once
    assert (split.total, split.windowed, split.dropped) == (1, 1, 0)


def test_every_row_cut_off_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "the film " * 20, "label": 0}])
    data = classification(str(path), max_length=4)
    assert "max_length" in error_of(lambda: tokenize_split(data, tokenizer, "train"))


# --------------------------------------------------------------------------- batches


def test_collate_pads_right_to_the_longest_row():
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]},
            {"input_ids": [9, 10], "labels": [IGNORE, 10]}]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE], [IGNORE, 10, IGNORE]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_supervised_count_counts_predicted_positions_with_loss():
    labels = torch.tensor([[IGNORE, 6, 7], [IGNORE, 8, IGNORE]])
    assert supervised_count(labels) == 3
    # nothing comes before a row's first token to predict it, so its label never carries loss
    assert supervised_count(torch.tensor([[5, 6, IGNORE]])) == 1


def test_tokenized_rows_collate_to_model_inputs(tmp_path, tokenizer):
    split = tokenize_split(classification(str(write_jsonl(tmp_path / "train.jsonl", REVIEWS))), tokenizer, "train")
    batch = collate(list(split.examples), tokenizer.pad_token_id)
    lengths = [len(row) for row in split.examples["input_ids"]]
    assert batch["input_ids"].shape == (len(REVIEWS), max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert supervised_count(batch["labels"]) == len(REVIEWS)  # one-token label words


# --------------------------------------------------------------------------- files and splits


def test_local_formats_give_the_same_examples(tmp_path, tokenizer):
    rows = REVIEWS
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    with (tmp_path / "a.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    expected = tokenize_split(classification(str(tmp_path / "a.jsonl")), tokenizer, "train").examples["input_ids"]
    # csv reads the empty text back as a missing value, so it gets a row of its own below
    for suffix in (".json", ".parquet"):
        got = tokenize_split(classification(str(tmp_path / f"a{suffix}")), tokenizer, "train").examples["input_ids"]
        assert got == expected, suffix
    csv_rows = load_rows(classification(str(tmp_path / "a.csv")), "train")
    assert csv_rows["text"][:3] == [row["text"] for row in rows[:3]]
    assert csv_rows["label"] == [row["label"] for row in rows]


def test_a_file_beside_the_source_is_a_split_only_when_named(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", REVIEWS)
    write_jsonl(tmp_path / "validation.jsonl", [{"text": "the plot", "label": 1}])
    assert tokenize_eval(classification(str(tmp_path / "train.jsonl")), tokenizer) is None
    named = classification({"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "validation.jsonl")})
    expected = ids(tokenizer, TEMPLATE.replace("{text}", "the plot")) + ids(tokenizer, " positive")
    assert tokenize_eval(named, tokenizer).examples["input_ids"] == [expected]


def test_dict_source_maps_splits_to_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", REVIEWS)
    write_jsonl(tmp_path / "b.jsonl", REVIEWS[:1])
    data = classification({"train": str(tmp_path / "a.jsonl"), "validation": str(tmp_path / "b.jsonl")})
    assert len(load_rows(data, "train")) == len(REVIEWS)
    assert len(load_rows(data, "validation")) == 1


def test_hub_code_path_via_a_local_dataset_folder(tmp_path, tokenizer):
    folder = tmp_path / "sst"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", REVIEWS[:2])
    write_jsonl(folder / "validation.jsonl", REVIEWS[2:])
    from_folder = classification(str(folder))
    from_files = classification({"train": str(folder / "train.jsonl"), "validation": str(folder / "validation.jsonl")})
    for split in ("train", "validation"):
        via_hub_loader = tokenize_split(from_folder, tokenizer, split).examples
        assert list(via_hub_loader) == list(tokenize_split(from_files, tokenizer, split).examples)
    assert "no split 'test'" in error_of(lambda: load_rows(from_folder, "test"))


def test_cached_tokenization_follows_changes_to_the_recipe(tmp_path, tokenizer):
    folder = tmp_path / "sst"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", REVIEWS[:2])
    for template in (TEMPLATE, "Text: {text}\nLabel:", TEMPLATE):
        got = tokenize_split(classification(str(folder), template=template), tokenizer, "train").examples["input_ids"]
        words = ["negative", "positive"]
        expected = [ids(tokenizer, template.replace("{text}", row["text"])) + ids(tokenizer, " " + words[row["label"]])
                    for row in REVIEWS[:2]]
        assert got == expected


def test_max_eval_examples_keeps_the_first_rows_of_the_eval_split(tmp_path, tokenizer):
    rows = [{"text": " ".join(["good"] * (i + 1)), "label": i % 2} for i in range(10)]
    source = {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)),
              "validation": str(write_jsonl(tmp_path / "validation.jsonl", rows))}
    full = tokenize_split(classification(source), tokenizer, "validation")
    capped = classification(source, max_eval_examples=3)
    eval_split = tokenize_eval(capped, tokenizer)
    assert eval_split.total == 3
    assert eval_split.examples["input_ids"] == full.examples["input_ids"][:3]
    assert tokenize_split(capped, tokenizer, "train").total == 10
    # the cap holds whatever split evaluation reads, the training split included
    assert tokenize_eval(classification(source, max_eval_examples=3, eval_split="train"), tokenizer).total == 3


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("template", "expected"),
    [("Review:", "must contain {text}"), ("{text} {foo}", "{foo}"), ("{text", "template"), ("{} {text}", "{}")],
)
def test_bad_template_is_a_clean_error(tmp_path, tokenizer, template, expected):
    data = classification(str(write_jsonl(tmp_path / "train.jsonl", REVIEWS)), template=template)
    message = error_of(lambda: tokenize_split(data, tokenizer, "train"))
    assert expected in message and "[data] template" in message


def test_label_not_in_labels_names_the_row_and_the_labels(tmp_path, tokenizer):
    rows = [{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"},
            {"text": "the film", "label": "neutral"}]
    data = classification(str(write_jsonl(tmp_path / "validation.jsonl", rows)))
    message = error_of(lambda: tokenize_split(data, tokenizer, "train"))
    assert "validation.jsonl row 3" in message and "'neutral'" in message and "['negative', 'positive']" in message


@pytest.mark.parametrize("label", [2, -1, True, None, 0.5])
def test_label_index_out_of_range_or_wrong_type_is_an_error(tmp_path, tokenizer, label):
    data = classification(str(write_jsonl(tmp_path / "train.jsonl", [{"text": "good", "label": label}])))
    assert "row 1: label" in error_of(lambda: tokenize_split(data, tokenizer, "train"))


def test_labels_required_and_distinct(tmp_path, tokenizer):
    path = str(write_jsonl(tmp_path / "train.jsonl", REVIEWS))
    assert "labels is empty" in error_of(lambda: tokenize_split(classification(path, labels=[]), tokenizer, "train"))
    message = error_of(lambda: label_token_ids(classification(path, labels=["good", "good"]), tokenizer))
    assert "same ids" in message


def test_malformed_jsonl_line_is_named(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0\n', encoding="utf-8")
    message = error_of(lambda: tokenize_split(classification(str(path)), tokenizer, "train"))
    assert "train.jsonl line 3 is not valid JSON" in message


def test_jsonl_line_that_is_not_an_object_is_named(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "good", "label": 1}\n[1, 2]\n', encoding="utf-8")
    assert "line 2 is a JSON list" in error_of(lambda: load_rows(classification(str(path)), "train"))


def test_missing_field_names_the_field_the_file_and_the_fields(tmp_path, tokenizer):
    data = classification(str(write_jsonl(tmp_path / "train.jsonl", REVIEWS)), text_field="sentence")
    message = error_of(lambda: tokenize_split(data, tokenizer, "train"))
    assert "train.jsonl has no field 'sentence' (fields: text, label)" in message and "text_field" in message


@pytest.mark.parametrize(("value", "expected"), [(None, "missing"), (42, "42, not text"), (["a"], "not text")])
def test_text_field_that_is_not_text_names_the_row(tmp_path, tokenizer, value, expected):
    rows = [{"text": "good", "label": 1}, {"text": value, "label": 0}]
    data = classification(str(write_jsonl(tmp_path / "train.jsonl", [rows[1]])))
    message = error_of(lambda: tokenize_split(data, tokenizer, "train"))
    assert "train.jsonl row 1: field 'text' is" in message and expected in message
    data = classification(str(write_jsonl(tmp_path / "mixed.jsonl", rows)))
    message = error_of(lambda: tokenize_split(data, tokenizer, "train"))
    assert "mixed.jsonl" in message and expected in message and "2: field 'text' is" in message


def test_field_with_mixed_types_names_the_odd_line(tmp_path, tokenizer):
    rows = [{"text": "good", "label": 1}, {"text": "fine", "label": "negative"}, {"text": 7, "label": 0}]
    message = error_of(lambda: load_rows(classification(str(write_jsonl(tmp_path / "train.jsonl", rows))), "train"))
    assert "line 3: field 'text' is 7, not text" in message
    del rows[2]
    message = error_of(lambda: load_rows(classification(str(write_jsonl(tmp_path / "train.jsonl", rows))), "train"))
    assert "line 2: field 'label' is str here but int on line 1" in message


def test_unreadable_extra_field_is_ignored(tmp_path, tokenizer):
    rows = [{"text": "good", "label": 1, "meta": 1}, {"text": "bad", "label": 0, "meta": "x"}]
    split = tokenize_split(classification(str(write_jsonl(tmp_path / "train.jsonl", rows))), tokenizer, "train")
    assert split.examples["label_index"] == [1, 0]


def test_missing_file_is_named(tmp_path, tokenizer):
    path = tmp_path / "nowhere" / "train.jsonl"
    assert str(path) in error_of(lambda: tokenize_split(classification(str(path)), tokenizer, "train"))


@pytest.mark.parametrize("name", ["train.jsonl", "train.json", "train.csv"])
def test_empty_file_is_an_error(tmp_path, tokenizer, name):
    path = tmp_path / name
    path.write_text("", encoding="utf-8")
    assert name in error_of(lambda: tokenize_split(classification(str(path)), tokenizer, "train"))


def test_missing_eval_file_explains_the_dict_source(tmp_path):
    data = classification(str(write_jsonl(tmp_path / "train.jsonl", REVIEWS)))
    message = error_of(lambda: load_rows(data, "validation"))
    assert "train.jsonl is one file" in message and "source = { train" in message and "eval_fraction" in message


def test_dict_source_without_the_split_lists_its_splits(tmp_path):
    data = classification({"train": str(write_jsonl(tmp_path / "train.jsonl", REVIEWS))})
    assert "no file for split 'validation' (splits: train)" in error_of(lambda: load_rows(data, "validation"))


def test_hub_dataset_offline_is_a_clean_error(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    data = classification("glue", config="sst2")
    message = error_of(lambda: load_rows(data, "train"))
    assert "'glue/sst2'" in message and "local file" in message


def test_missing_dataset_folder_is_named(tmp_path):
    data = classification(str(tmp_path / "gone"))
    assert "gone is neither a data file nor a dataset folder" in error_of(lambda: load_rows(data, "train"))


def test_non_utf8_jsonl_line_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "good", "label": 1}\n{"text": "\xff", "label": 1}\n')
    assert "line 2 is not UTF-8" in error_of(lambda: load_rows(classification(str(path)), "train"))


# --------------------------------------------------------------------------- length-grouped batches


def padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in batch) * len(batch) - sum(lengths[i] for i in batch) for batch in batches)


def varied_lengths(count: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 200) for _ in range(count)]


VARIED = varied_lengths(1003)


def test_length_grouped_batches_cover_every_index_once():
    batches = length_grouped_batches(VARIED, batch_size=8, seed=3, epoch=0)
    assert sorted(i for batch in batches for i in batch) == list(range(len(VARIED)))
    assert sorted(len(batch) for batch in batches) == [len(VARIED) % 8] + [8] * (len(VARIED) // 8)


def test_length_grouped_batches_are_deterministic_and_differ_by_epoch():
    first = length_grouped_batches(VARIED, batch_size=8, seed=3, epoch=0)
    assert first == length_grouped_batches(VARIED, batch_size=8, seed=3, epoch=0)
    assert first != length_grouped_batches(VARIED, batch_size=8, seed=3, epoch=1)
    assert first != length_grouped_batches(VARIED, batch_size=8, seed=4, epoch=0)


def test_length_grouped_batches_cut_padding_against_random_batches():
    order = list(range(len(VARIED)))
    random.Random(5).shuffle(order)
    random_batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    grouped = length_grouped_batches(VARIED, batch_size=8, seed=3, epoch=0)
    assert padding(grouped, VARIED) < padding(random_batches, VARIED) / 5
