"""The data shapes users bring: named template fields, completion and chat fitted to max_length, chat's loss on
assistant turns, evaluation that is optional (one file, eval_split = "", eval_fraction), the model's context.

Expected ids come from the tokenizer on text written here by hand, never from lorafit's own output.
"""

from __future__ import annotations

import json

import datasets
import pytest
import torch
import transformers
from conftest import LLAMA_SHAPE, TINY_DATA, assert_one_line_error, build_tokenizer, write_jsonl, write_recipe
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.data.prompts import prompt_ids, render_prompt
from lorafit.data.rows import HELD_OUT, held_out_rows
from lorafit.data.tasks import IGNORE
from lorafit.data.tokenize import tokenize_eval, tokenize_split
from lorafit.errors import LorafitError
from lorafit.model.load import load_tokenizer
from lorafit.recipe import DataSection

ALPACA = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATIONS = [
    [{"role": "system", "content": "I review films."}, {"role": "user", "content": "the film was good"},
     {"role": "assistant", "content": "positive review"}, {"role": "user", "content": "the plot was dull"},
     {"role": "assistant", "content": "negative review and a bad plot"}],
    [{"role": "user", "content": "I loved it"}, {"role": "assistant", "content": "positive"}],
]
runner = CliRunner()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))


def ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def supervised(example: dict) -> list[int]:
    return [label for label in example["labels"] if label != IGNORE]


# --------------------------------------------------------------------------- templates with named fields


def test_completion_template_fills_named_fields(tmp_path, tokenizer):
    rows = [{"instruction": "review the film", "input": "it was good", "output": "positive"}]
    data = DataSection(source=str(write_jsonl(tmp_path / "a.jsonl", rows)), task="completion", template=ALPACA,
                       response_field="output")
    example = tokenize_split(data, tokenizer, "train").examples[0]
    prompt = ids(tokenizer, ALPACA.replace("{instruction}", "review the film").replace("{input}", "it was good"))
    target = ids(tokenizer, "positive", special=False) + [tokenizer.eos_token_id]
    assert example["input_ids"] == prompt + target
    assert example["labels"] == [IGNORE] * len(prompt) + target
    assert prompt_ids(data, tokenizer, rows[0]) == prompt  # what `generate` feeds the model


def test_template_field_missing_from_the_rows_is_named(tmp_path, tokenizer):
    rows = [{"instruction": "review the film", "output": "positive"}]
    data = DataSection(source=str(write_jsonl(tmp_path / "a.jsonl", rows)), task="completion", template=ALPACA,
                       response_field="output")
    with pytest.raises(LorafitError) as caught:
        tokenize_split(data, tokenizer, "train")
    message = str(caught.value)
    assert "no field 'input'" in message and "[data] template" in message and "\n" not in message


# --------------------------------------------------------------------------- completion fitted from the left


def test_completion_keeps_response_and_eos_by_dropping_prompt_tokens_from_the_left(tmp_path, tokenizer):
    prompt_text = "question: " + "the film was very good and the plot was dull " * 4
    rows = [{"prompt": prompt_text, "response": " answer: good"}]
    data = DataSection(source=str(write_jsonl(tmp_path / "a.jsonl", rows)), task="completion", max_length=12)
    split = tokenize_split(data, tokenizer, "train")
    example = split.examples[0]
    target = ids(tokenizer, " answer: good", special=False) + [tokenizer.eos_token_id]
    prompt = ids(tokenizer, prompt_text)
    assert example["input_ids"] == prompt[-(12 - len(target)):] + target
    assert supervised(example) == target
    assert (split.shortened, split.cut, split.dropped) == (1, 0, 0)


def test_completion_response_too_long_is_cut_and_counted(tmp_path, tokenizer):
    response = " the film was good but the plot was dull and the acting was bad"
    rows = [{"prompt": "question: the film", "response": response}]
    data = DataSection(source=str(write_jsonl(tmp_path / "a.jsonl", rows)), task="completion", max_length=8)
    split = tokenize_split(data, tokenizer, "train")
    target = ids(tokenizer, response, special=False) + [tokenizer.eos_token_id]
    example = split.examples[0]
    # one prompt token of context stays before the response, which keeps its first 7 tokens
    assert example["input_ids"] == ids(tokenizer, "question: the film")[-1:] + target[:7]
    assert (split.cut, split.cut_tokens) == (1, len(target) - 7)
    assert "lost" in split.note()


# --------------------------------------------------------------------------- chat


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Llama folder whose tokenizer carries a ChatML chat template with <|im_end|> ending each turn."""
    folder = tmp_path_factory.mktemp("chat-llama")
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    shape = {**LLAMA_SHAPE, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).save_pretrained(folder)
    return folder


def chat_pieces(tokenizer, messages: list[dict], last_only: bool = False) -> tuple[list[int], list[bool]]:
    """ChatML written out by hand, piece by piece: (ids, which carry loss)."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    out, mask = [], []
    for i, message in enumerate(messages):
        loss = message["role"] == "assistant" and (i == last or not last_only)
        for piece, flag in ((ids(tokenizer, f"<|im_start|>{message['role']}\n", False), False),
                            (ids(tokenizer, message["content"], False) + [end], loss),
                            (ids(tokenizer, "\n", False), False)):
            out += piece
            mask += [flag] * len(piece)
    return out, mask


@pytest.mark.parametrize("turns", ["all", "last"])
def test_chat_supervises_exactly_assistant_contents_and_end_of_turn(tmp_path, chat_model, turns):
    tokenizer = load_tokenizer(str(chat_model))
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    data = DataSection(source=str(path), task="chat", assistant_turns=turns, max_length=128)
    split = tokenize_split(data, tokenizer, "train")
    for messages, example in zip(CONVERSATIONS, split.examples):
        expected, mask = chat_pieces(tokenizer, messages, last_only=turns == "last")
        assert example["input_ids"] == expected
        assert example["labels"] == [t if flag else IGNORE for t, flag in zip(expected, mask)]


def test_sharegpt_rows_and_a_recipe_template_give_the_same_examples(tmp_path, chat_model):
    tokenizer = load_tokenizer(str(chat_model))
    shared = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                  "value": m["content"]} for m in messages]} for messages in CONVERSATIONS]
    openai = DataSection(source=str(write_jsonl(tmp_path / "a.jsonl", [{"messages": m} for m in CONVERSATIONS])),
                         task="chat")
    sharegpt = DataSection(source=str(write_jsonl(tmp_path / "b.jsonl", shared)), task="chat",
                           messages_field="conversations", chat_template=CHATML)
    plain = build_tokenizer()  # no chat template: the recipe's is used
    plain.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert list(tokenize_split(sharegpt, plain, "train").examples) == list(tokenize_split(openai, tokenizer, "train")
                                                                             .examples)
    with pytest.raises(LorafitError, match="chat_template"):
        tokenize_split(DataSection(source=openai.source, task="chat"), plain, "train")


def test_chat_row_without_assistant_turn_is_left_out_and_counted(tmp_path, chat_model):
    tokenizer = load_tokenizer(str(chat_model))
    rows = [{"messages": CONVERSATIONS[1]}, {"messages": [{"role": "user", "content": "hello"}]}]
    split = tokenize_split(DataSection(source=str(write_jsonl(tmp_path / "a.jsonl", rows)), task="chat"),
                           tokenizer, "train")
    assert (split.total, split.dropped, len(split.examples)) == (2, 1, 1)


def test_chat_prompt_for_generation_ends_with_the_assistant_opening(chat_model):
    tokenizer = load_tokenizer(str(chat_model))
    data = DataSection(task="chat")
    assert render_prompt(data, tokenizer, "the film") == "<|im_start|>user\nthe film<|im_end|>\n<|im_start|>assistant\n"


def test_chat_run_saves_its_template_beside_the_adapter(tmp_path, chat_model):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS * 4])
    recipe = write_recipe(tmp_path, model={"name": str(chat_model)},
                          data={"source": str(path), "task": "chat", "max_length": 24, "template": "{text}"},
                          train={"max_steps": 2, "batch_size": 4})
    result = runner.invoke(app, ["train", "--recipe", str(recipe), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (tmp_path / "run" / "adapter" / "chat_template.jinja").read_text() == CHATML
    assert report["eval"]["skipped"] and "no evaluation" in result.stderr  # one file: no eval split
    # 24 tokens are too few for the first conversation: its early turns go, its last answer stays
    assert report["data"]["train"]["cut"] == 4 and "'train': of 8 rows, 4 lost" in result.stderr


def test_max_length_beyond_the_model_context_is_refused_before_any_work(tmp_path, chat_model):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    recipe = write_recipe(tmp_path, model={"name": str(chat_model)},
                          data={"source": str(path), "task": "chat", "max_length": 4096, "template": "{text}"})
    line = assert_one_line_error(runner.invoke(app, ["train", "--recipe", str(recipe)]))
    assert "max_length = 4096" in line and "context of 64" in line
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- optional evaluation


def test_eval_fraction_holds_out_a_fixed_share_of_the_training_rows(tmp_path, tokenizer):
    rows = [{"text": f"the film number {i}", "label": i % 2} for i in range(40)]
    data = DataSection(source=str(write_jsonl(tmp_path / "a.jsonl", rows)), text_field="text",
                       labels=["negative", "positive"], eval_fraction=0.25)
    train_part = tokenize_split(data, tokenizer, "train")
    held = tokenize_eval(data, tokenizer)
    assert held.name == HELD_OUT and (held.total, train_part.total) == (10, 30)
    sources = {tokenizer.decode(row["input_ids"][: row["prompt_len"]]) for row in held.examples}
    expected = {rows[i]["text"] for i in held_out_rows(40, 0.25)}
    assert sources == expected
    assert not sources & {tokenizer.decode(row["input_ids"][: row["prompt_len"]]) for row in train_part.examples}
    capped = DataSection(**{**data.model_dump(), "max_eval_examples": 4})
    assert tokenize_eval(capped, tokenizer).total == 4


def test_empty_eval_split_means_no_evaluation(tmp_path, tokenizer):
    source = {"train": str(write_jsonl(tmp_path / "a.jsonl", [{"text": "good", "label": 1}])),
              "validation": str(write_jsonl(tmp_path / "b.jsonl", [{"text": "bad", "label": 0}]))}
    data = DataSection(source=source, text_field="text", labels=["negative", "positive"], eval_split="")
    assert tokenize_eval(data, tokenizer) is None


def test_single_file_trains_without_the_file_beside_it_and_eval_fraction_evaluates(tmp_path):
    lines = (TINY_DATA / "train.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "train.jsonl").write_text("".join(lines[:200]))
    (tmp_path / "validation.jsonl").write_text("".join(lines[200:240]))  # beside it, never named: not used
    recipe = write_recipe(tmp_path, data={"source": str(tmp_path / "train.jsonl"), "max_eval_examples": 0},
                          train={"max_steps": 1})
    result = runner.invoke(app, ["train", "--recipe", str(recipe), "--json"])
    assert result.exit_code == 0, result.stderr
    evaluation = json.loads(result.stdout)["eval"]
    assert evaluation["examples"] == 0 and "one file" in evaluation["skipped"]
    line = assert_one_line_error(runner.invoke(app, ["eval", "--recipe", str(recipe)]))
    assert "no evaluation rows" in line
    held = write_recipe(tmp_path, data={"source": str(tmp_path / "train.jsonl"), "eval_fraction": 0.1,
                                        "max_eval_examples": 0}, output={"dir": str(tmp_path / "held")},
                        train={"max_steps": 1})
    result = runner.invoke(app, ["train", "--recipe", str(held), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["eval"]["examples"] == 20 and report["data"]["train"]["rows"] == 180
