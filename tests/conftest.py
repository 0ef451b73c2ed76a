"""Tiny models built from configs, one per architecture in the targets table."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread per xdist worker: 2 cores, -n 2

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

VOCAB = 128
SMALL = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
LLAMA_SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
TINY_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, **SMALL),
    "llama": lambda: transformers.LlamaConfig(**LLAMA_SHAPE, **SMALL),
    "mistral": lambda: transformers.MistralConfig(**LLAMA_SHAPE, **SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA_SHAPE, **SMALL),
    "qwen3": lambda: transformers.Qwen3Config(**LLAMA_SHAPE, head_dim=8, **SMALL),
    "phi3": lambda: transformers.Phi3Config(**LLAMA_SHAPE, **SMALL),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, **SMALL
    ),
    "bloom": lambda: transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **SMALL),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
        max_position_embeddings=64, **SMALL
    ),
}
ARCHITECTURES = list(TINY_CONFIGS)


def tiny_config(arch: str):
    return TINY_CONFIGS[arch]()


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny causal LM in eval mode, identical for the same seed."""
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "data" / "tiny-gpt2"
TINY_DATA = REPO / "data" / "sst-tiny"


def write_recipe(folder, **sections):
    """A small, fast recipe on the shipped tiny model and data; `sections` override keys, e.g. train={"lr": 1e-3}."""
    import tomli_w

    recipe = {
        "model": {"name": str(TINY_MODEL)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.05, "targets": ["q", "v"]},
        "data": {
            "source": {"train": str(TINY_DATA / "train.jsonl"), "validation": str(TINY_DATA / "validation.jsonl")},
            "task": "classification",
            "labels": ["negative", "positive"],
            "template": "Review: {text}\nSentiment:",
            "max_length": 64,
            "max_eval_examples": 16,
        },
        "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "log_every": 2, "seed": 7},
        "output": {"dir": str(folder / "run")},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = folder / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    return path


@pytest.fixture
def tiny_recipe(tmp_path):
    """Factory: tiny_recipe(**sections) -> path of a recipe whose run folder is tmp_path/run."""
    return lambda **sections: write_recipe(tmp_path, **sections)


EOS = "<|endoftext|>"
WORDS = ["the", "film", "was", "good", "bad", "plot", "story", "acting", "great", "dull", "and", "but",
         "I", "loved", "hated", "it", "a", "very", "positive", "negative", "review", "sentiment", "question", "answer"]


def build_tokenizer():
    """A small byte-level BPE (GPT-2 style), trained here on generated sentences."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "." for _ in range(400)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()
