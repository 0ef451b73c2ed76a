"""Batched decoding (left-padded prompts, KV cache) gives what transformers' generate gives each prompt alone, beam
search included; completions end at end tokens and stop strings."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import LLAMA_SHAPE, TINY_MODEL

from lorafit.generation.decoding import END_TOKEN, MAX_NEW_TOKENS, STOP_STRING, Decoding, decode, held_back
from lorafit.model.load import load_tokenizer

PROMPTS = ["the film was", "a dull plot and the acting was very", "I"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TINY_MODEL))


def shipped_gpt2():
    return transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL).double().eval()


def random_llama(vocab: int):
    """Rotary positions and grouped-query attention: what left padding could break that GPT-2 does not have."""
    torch.manual_seed(3)
    config = transformers.LlamaConfig(**LLAMA_SHAPE, vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config).double().eval()


def alone(model, tokenizer, text: str, **settings) -> list[int]:
    """transformers' generate on one unpadded prompt: the new tokens, cut after the first end token."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, do_sample=False, **settings)[0, ids.shape[1]:].tolist()
    return out[: out.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in out else out


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_batched_beam_search_equals_transformers_generate_on_each_prompt_alone(tokenizer, architecture):
    model = shipped_gpt2() if architecture == "gpt2" else random_llama(len(tokenizer))
    settings = {"num_beams": 4, "length_penalty": 0.8, "no_repeat_ngram_size": 3, "max_new_tokens": 12}
    batched = decode(model, tokenizer, [tokenizer(text)["input_ids"] for text in PROMPTS], Decoding(**settings))
    for text, done in zip(PROMPTS, batched):
        expected = alone(model, tokenizer, text, **settings)
        assert done.ids == expected
        assert done.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert done.stop == (END_TOKEN if expected[-1] == tokenizer.eos_token_id else MAX_NEW_TOKENS)


def test_batched_greedy_equals_greedy_alone(tokenizer):
    model = shipped_gpt2()
    batched = decode(model, tokenizer, [tokenizer(text)["input_ids"] for text in PROMPTS], Decoding(max_new_tokens=10))
    assert [done.ids for done in batched] == [alone(model, tokenizer, text, max_new_tokens=10) for text in PROMPTS]


def test_a_stop_string_ends_the_completion_before_it(tokenizer):
    model = shipped_gpt2()
    free = tokenizer.decode(alone(model, tokenizer, PROMPTS[0], max_new_tokens=16), skip_special_tokens=True)
    stop = free.strip().split()[2]  # a word some way into the free completion
    [done] = decode(model, tokenizer, [tokenizer(PROMPTS[0])["input_ids"]], Decoding(max_new_tokens=16, stop=(stop,)))
    assert done.stop == STOP_STRING
    assert done.text == free[: free.index(stop)]
    assert stop in tokenizer.decode(done.ids) and stop not in tokenizer.decode(done.ids[:-1])


def test_held_back_streams_all_but_what_may_start_a_stop_string():
    assert held_back("one two\n", ("\n\n",)) == ("one two", False)
    assert held_back("one two\n\nthree", ("\n\n",)) == ("one two", True)
    assert held_back("one ##", ("###", "END")) == ("one ", False)
    assert held_back("one E", ()) == ("one E", False)
