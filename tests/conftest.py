"""What the tests share: tiny models built from configs (one per architecture in the targets table), adapters with
a visible effect, recipes on the shipped tiny model, and the evidence helpers (logits, snapshots, one-line errors)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread per xdist worker: 2 cores, -n 2

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

if TYPE_CHECKING:
    from lorafit.lora.linear import LoRALinear

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
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**LLAMA_SHAPE, head_dim=8, **SMALL),
    # Mixture-of-experts: 4 experts, 2 per token, expert width 24 so that no stacked dimension equals another.
    # Qwen3-MoE's second layer is dense (mlp_only_layers): "down" there is a linear layer, in the first a stack.
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **LLAMA_SHAPE, head_dim=8, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
        **SMALL
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        **{**LLAMA_SHAPE, "intermediate_size": 24}, num_local_experts=4, num_experts_per_tok=2, **SMALL
    ),
    "olmoe": lambda: transformers.OlmoeConfig(
        **{**LLAMA_SHAPE, "intermediate_size": 24}, num_experts=4, num_experts_per_tok=2, **SMALL
    ),
    "gpt_oss": lambda: transformers.GptOssConfig(  # experts stored [experts, d_in, d_out], with biases
        **{**LLAMA_SHAPE, "intermediate_size": 24}, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=8, **SMALL
    ),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(  # latent attention; a dense first layer, shared experts
        **{**LLAMA_SHAPE, "num_key_value_heads": 4}, moe_intermediate_size=24, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=16,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, **SMALL
    ),
}
MOE = ("qwen3_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3")
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


@torch.no_grad()
def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float32 rounding: what two computations of the same logits may differ by."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def supervised_rows() -> list[dict]:
    """Eight token rows of different lengths with 1 to 8 supervised tokens each, so that micro-batch means differ."""
    from lorafit.data.tasks import IGNORE

    generator = torch.Generator().manual_seed(1)
    rows = []
    for i in range(8):
        prompt_len, target_len = 3 + (5 * i) % 7, 1 + i
        ids = torch.randint(2, 128, (prompt_len + target_len,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt_len + ids[prompt_len:]})
    return rows


# ---------------------------------------------------------------- adapters with a visible effect

RANK, ALPHA = 4, 8
# What peft users write for q and v on each architecture.
PEFT_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"]}


def randomize(layers: dict[str, LoRALinear], seed: int = 1) -> None:
    """Non-zero A and B, so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator))
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=generator))


def adapted(arch: str, targets: list[str], **options) -> tuple[torch.nn.Module, dict[str, LoRALinear]]:
    """A tiny model with LoRA of rank RANK on `targets`, A and B randomized: the model and its LoRA layers."""
    from lorafit.model.inject import inject_lora

    model = tiny_model(arch)
    layers = inject_lora(model, targets, RANK, ALPHA, **options)
    randomize(layers)
    return model, layers


def saved_adapter(arch: str, directory: Path, targets: tuple[str, ...] = ("q", "v")) -> torch.nn.Module:
    """An `adapted` model saved by lorafit into `directory`; returns the wrapped model it came from."""
    from lorafit.adapter.save import save_adapter

    model, _ = adapted(arch, list(targets))
    save_adapter(model, directory, base_model="tiny", targets=list(targets))
    return model


def adapter_config(directory: Path) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())


def peft_logits(arch: str, directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    """The logits of a fresh tiny `arch` model with the adapter in `directory` loaded by peft itself."""
    import peft

    return logits(peft.PeftModel.from_pretrained(tiny_model(arch), directory).eval(), tokens)


def peft_written(arch: str, directory: Path, **options) -> torch.nn.Module:
    """An adapter saved by peft itself, with a non-zero B (init_lora_weights=False draws both A and B)."""
    import peft

    settings = {"r": RANK, "lora_alpha": ALPHA, "target_modules": PEFT_TARGETS[arch], "fan_in_fan_out": arch == "gpt2"}
    settings.update(options)
    config = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **settings)
    torch.manual_seed(3)
    model = peft.get_peft_model(tiny_model(arch), config).eval()
    model.save_pretrained(directory)
    return model


# ---------------------------------------------------------------- GPT-3 175B, from its config alone

# GPT-3 175B's shape (Brown et al. 2020, table 2.1) as a GPT-2 config; the LoRA paper's table 4 counts.
GPT3_SHAPE = {"n_layer": 96, "n_embd": 12288, "n_head": 96, "vocab_size": 50257, "n_positions": 2048}
GPT2_MEDIUM_SHAPE = {"n_layer": 24, "n_embd": 1024, "n_head": 16}


@pytest.fixture(scope="session")
def gpt3_dir(tmp_path_factory) -> str:
    """A folder holding only the config.json of GPT-3 175B's shape: all that `describe` and `lorafit info` read."""
    folder = tmp_path_factory.mktemp("gpt3-175b")
    transformers.GPT2Config(**GPT3_SHAPE).save_pretrained(folder)
    return str(folder)


def gpt2_closed_form(config) -> int:
    """GPT-2 with tied lm_head: wte + wpe + per layer (12d² + 13d) + final layer norm."""
    d, layers = config.n_embd, config.n_layer
    return config.vocab_size * d + config.n_positions * d + layers * (12 * d * d + 13 * d) + 2 * d


# ---------------------------------------------------------------- evidence that nothing was written


def snapshot(folder: Path) -> dict[str, tuple[str, int] | None]:
    """Every entry under `folder`: a file as (hash of its bytes, modification time), a folder as None.

    Two equal snapshots mean nothing was created, removed, rewritten or even touched in between.
    """
    return {
        str(path.relative_to(folder)): (
            (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns) if path.is_file() else None
        )
        for path in sorted(folder.rglob("*"))
    }


def assert_one_line_error(result) -> str:
    """A CLI result refused as bad input: exit 2, one `error: ` line on stderr, nothing on stdout, no traceback.

    Returns that line.
    """
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert result.stdout == ""
    return lines[0]


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


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """`rows` as a JSON-lines file at `path`."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
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
