"""`lorafit generate`: the recipe's prompt format, greedy decoding as an independent loop computes it, the end token,
seeded sampling, and classification by the probability of each label word."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, TINY_MODEL, assert_one_line_error, randomize, write_jsonl, write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from lorafit.adapter.load import load_adapter
from lorafit.adapter.merge import merge_adapter
from lorafit.adapter.save import save_adapter
from lorafit.cli import app
from lorafit.generate import generate, prompt_ids
from lorafit.generation.decoding import Decoding
from lorafit.model.inject import inject_lora
from lorafit.recipe import DataSection, load_recipe

TEMPLATE = "Question: {text}\nAnswer:"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A visible q,v adapter on the shipped tiny model."""
    folder = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    randomize(inject_lora(model, ["q", "v"], rank=4, alpha=8), seed=5)
    save_adapter(model, folder, base_model=str(TINY_MODEL), targets=["q", "v"])
    return folder


def completion_recipe(tmp_path, **data):
    return load_recipe(write_recipe(tmp_path, data={"task": "completion", "template": TEMPLATE, **data}))


@torch.no_grad()
def greedy_by_hand(adapter_dir, prompt: str, steps: int, ends: set[int]) -> list[int]:
    """Argmax of the full forward, one token at a time, no cache, stopping after an end token."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
    load_adapter(model, adapter_dir)
    ids = tokenizer(TEMPLATE.format(text=prompt))["input_ids"]
    new = []
    for _ in range(steps):
        token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        new.append(token)
        if token in ends:
            break
    return new


def test_greedy_completion_is_the_argmax_continuation_of_the_templated_prompt(tmp_path, adapter_dir):
    recipe = completion_recipe(tmp_path)
    pieces = []
    [result] = generate(recipe, ["the film was"], adapter=adapter_dir, decoding=Decoding(max_new_tokens=10),
                        stream=lambda index, text, done: pieces.append((index, text, done)))
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    expected = greedy_by_hand(adapter_dir, "the film was", 10, {tokenizer.eos_token_id})
    assert result["completion"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert result["new_tokens"] == len(expected)
    assert "".join(text for _, text, _ in pieces) == result["completion"]  # streamed, all of it
    assert pieces[-1][2] and all(index == 0 for index, _, _ in pieces)


def test_generation_stops_at_the_end_token_of_a_merged_models_generation_config(tmp_path, adapter_dir):
    """Make a later greedy token an end token of a --model folder: the completion stops right after it."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    free = greedy_by_hand(adapter_dir, "a dull plot", 6, set())
    stop = next(k for k in range(1, len(free)) if free[k] not in free[:k])  # its first appearance
    out = tmp_path / "merged"
    merge_adapter(str(TINY_MODEL), adapter_dir, out, force=False)
    config = json.loads((out / "generation_config.json").read_text())
    config["eos_token_id"] = free[stop]
    (out / "generation_config.json").write_text(json.dumps(config))
    [result] = generate(completion_recipe(tmp_path), ["a dull plot"], model_dir=out,
                        decoding=Decoding(max_new_tokens=6))
    assert result["stop"] == "end token" and result["new_tokens"] == stop + 1
    assert result["completion"] == tokenizer.decode(free[: stop + 1], skip_special_tokens=True)


def test_sampling_is_seeded_and_differs_from_greedy(tmp_path, adapter_dir):
    recipe = completion_recipe(tmp_path)

    def sample(seed, temperature=1.5):
        decoding = Decoding(max_new_tokens=12, temperature=temperature, top_p=0.95, seed=seed)
        return [r["completion"] for r in generate(recipe, ["the plot", "the plot"], adapter=adapter_dir,
                                                  decoding=decoding)]

    first, again, other = sample(1), sample(1), sample(2)
    assert first == again and first[0] == first[1]  # each prompt starts from the seed
    assert other != first
    assert sample(1, temperature=0.0) != first


def test_classification_prints_the_label_with_its_probability_among_the_labels(tmp_path, adapter_dir):
    recipe = load_recipe(write_recipe(tmp_path))  # the tiny sentiment recipe: labels negative, positive
    [result] = generate(recipe, ["a gripping, moving film"], adapter=adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
    load_adapter(model, adapter_dir)
    prompt = tokenizer("Review: a gripping, moving film\nSentiment:")["input_ids"]
    scores = []
    with torch.no_grad():
        for word in (" negative", " positive"):
            label = tokenizer(word, add_special_tokens=False)["input_ids"]
            logprobs = model(input_ids=torch.tensor([prompt + label])).logits[0].log_softmax(-1)
            scores.append(sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(label)))
    expected = torch.tensor(scores).softmax(0)
    assert result["probabilities"] == pytest.approx(dict(zip(["negative", "positive"], expected.tolist())), abs=1e-5)
    assert result["label"] == ["negative", "positive"][int(expected.argmax())]
    assert result["probability"] == pytest.approx(float(expected.max()), abs=1e-5)


def test_cli_json_holds_one_completion_per_prompt_from_arguments_and_a_jsonl_file(tmp_path, adapter_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the acting"}) + "\n")
    recipe = write_recipe(tmp_path, data={"task": "completion", "template": TEMPLATE})
    result = CliRunner().invoke(app, ["generate", "-r", str(recipe), "--adapter", str(adapter_dir), "the film",
                                      "--prompts", str(prompts), "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.stderr
    completions = json.loads(result.stdout)["completions"]
    assert [c["prompt"] for c in completions] == ["the film", {"prompt": "the acting"}]
    assert all(c["new_tokens"] <= 4 for c in completions)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no prompt given"),
        (["x", "--prompts", "missing.txt"], "prompts file missing.txt does not exist"),
        (["x", "--model", "m"], "give --adapter or --model, not both"),
    ],
)
def test_generate_bad_input_is_one_line_exit_2(tmp_path, adapter_dir, extra, message):
    recipe = write_recipe(tmp_path, data={"task": "completion", "template": TEMPLATE})
    result = CliRunner().invoke(app, ["generate", "-r", str(recipe), "--adapter", str(adapter_dir), *extra])
    assert message in assert_one_line_error(result)


def test_a_prompt_longer_than_the_context_is_refused(tmp_path, adapter_dir):
    recipe = write_recipe(tmp_path, data={"task": "completion", "template": TEMPLATE})
    result = CliRunner().invoke(app, ["generate", "-r", str(recipe), "--adapter", str(adapter_dir), "film " * 400])
    assert "the model's context holds" in assert_one_line_error(result)


def test_a_chat_prompt_is_a_user_turn_with_the_assistants_turn_opened():
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    data = DataSection(task="chat")
    expected = tokenizer("<user>the film was\n<assistant>", add_special_tokens=False)["input_ids"]
    assert prompt_ids(data, tokenizer, "the film was") == expected
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the film was"}]}
    assert prompt_ids(data, tokenizer, row) == tokenizer(
        "<system>be brief\n<user>the film was\n<assistant>", add_special_tokens=False)["input_ids"]


ALPACA = REPO / "recipes" / "tiny-alpaca.toml"


def test_a_plain_prompt_fills_the_main_field_of_a_template_with_several_and_says_how_to_give_them_all(adapter_dir):
    recipe = load_recipe(ALPACA)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    expected = tokenizer(recipe.data.template.format(instruction="Name a colour.", input=""))["input_ids"]
    assert prompt_ids(recipe.data, tokenizer, "Name a colour.") == expected
    result = CliRunner().invoke(app, ["generate", "-r", str(ALPACA), "--adapter", str(adapter_dir), "Name a colour.",
                                      "--max-new-tokens", "2"], terminal_width=400)
    assert result.exit_code == 0, result.stderr
    assert ("note: a plain prompt fills the template's {instruction} and leaves {input} empty; to give every field: "
            '--prompts FILE.jsonl with one row per line, such as {"instruction": "...", "input": "..."}') in result.stderr


def test_a_prompt_row_without_a_field_of_the_template_is_refused_showing_the_prompts_form(tmp_path, adapter_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": "Name a colour."}])
    result = CliRunner().invoke(app, ["generate", "-r", str(ALPACA), "--adapter", str(adapter_dir),
                                      "--prompts", str(prompts)], terminal_width=400)
    line = assert_one_line_error(result)
    assert "prompt 1 has no field 'input'" in line and '--prompts FILE.jsonl with one row per line, such as ' \
        '{"instruction": "...", "input": "..."}' in line


def test_prompt_rows_are_named_as_text_above_their_completions(tmp_path, adapter_dir):
    rows = [{"instruction": "Name a colour.", "input": "[b]sky"}, {"instruction": "Say hi.", "input": ""}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    result = CliRunner().invoke(app, ["generate", "-r", str(ALPACA), "--adapter", str(adapter_dir),
                                      "--prompts", str(prompts), "--max-new-tokens", "2"], terminal_width=400)
    assert result.exit_code == 0, result.stderr
    assert "── 1: instruction: Name a colour.  input: [b]sky" in result.stderr
    assert "── 2: instruction: Say hi.  input: " in result.stderr
    assert "{'" not in result.stderr


def test_an_empty_completion_says_that_the_model_ended_it_at_once(tmp_path, adapter_dir):
    """A merged model whose tokenizer's end token is the first token greedy decoding gives: nothing to show."""
    first = greedy_by_hand(adapter_dir, "a dull plot", 1, set())[0]
    out = tmp_path / "merged"
    merge_adapter(str(TINY_MODEL), adapter_dir, out, force=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(first)
    tokenizer.save_pretrained(out)
    recipe = write_recipe(tmp_path, data={"task": "completion", "template": TEMPLATE})
    result = CliRunner().invoke(app, ["generate", "-r", str(recipe), "--model", str(out), "a dull plot",
                                      "--max-new-tokens", "4"], terminal_width=400)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == ""
    assert ("note: prompt 1's completion is empty: the model's first new token was its end token, so it stopped at "
            "once") in result.stderr


def test_streamed_text_stops_before_a_stop_string_and_beam_search_prints_when_done(tmp_path, adapter_dir):
    recipe = completion_recipe(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    free = tokenizer.decode(greedy_by_hand(adapter_dir, "the film was", 16, {tokenizer.eos_token_id}),
                            skip_special_tokens=True)
    stop = free.strip().split()[2][:3]  # a piece of a word some way in: its first letters arrive before it is known
    pieces = []
    [result] = generate(recipe, ["the film was"], adapter=adapter_dir, decoding=Decoding(max_new_tokens=16, stop=(stop,)),
                        stream=lambda index, text, done: pieces.append((text, done)))
    assert result["stop"] == "stop string" and result["completion"] == free[: free.index(stop)]
    assert "".join(text for text, _ in pieces) == result["completion"]
    assert [done for _, done in pieces].count(True) == 1 and pieces[-1][1]
    pieces.clear()
    [beamed] = generate(recipe, ["the film was"], adapter=adapter_dir, decoding=Decoding(max_new_tokens=6, num_beams=3),
                        stream=lambda index, text, done: pieces.append((text, done)))
    assert pieces == [(beamed["completion"], True)]
