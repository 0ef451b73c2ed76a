"""Where each architecture keeps its projections: semantic targets (q, k, v, o, gate, up, down) -> modules.

One row of ARCHITECTURES per `config.model_type`. A target names a module by its path suffix inside a
block; for a fused projection it also gives the output rows that belong to it, so that "q and v" on
GPT-2's c_attn adapts exactly the q and v rows and leaves k alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

SEMANTIC_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

RowsFn = Callable[[object], list[int]]


@dataclass(frozen=True)
class Target:
    module: str  # path suffix inside a block, e.g. "attn.c_attn"
    rows: RowsFn | None = None  # output rows of a fused projection; None = the whole module


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _qkv_sizes(config) -> tuple[int, int, int]:
    """Output widths of q, k and v (k and v are narrower under grouped-query attention)."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = _head_dim(config)
    return config.num_attention_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim


def contiguous(part: int) -> RowsFn:
    """Part `part` of a projection laid out [q | k | v] (GPT-2 c_attn, Phi-3 qkv_proj)."""

    def rows(config) -> list[int]:
        sizes = _qkv_sizes(config)
        start = sum(sizes[:part])
        return list(range(start, start + sizes[part]))

    return rows


def per_head(part: int) -> RowsFn:
    """Part `part` of a projection interleaved per head, [head, (q, k, v), head_dim] (GPT-NeoX, BLOOM)."""

    def rows(config) -> list[int]:
        head_dim = _head_dim(config)
        return [
            (head * 3 + part) * head_dim + i for head in range(config.num_attention_heads) for i in range(head_dim)
        ]

    return rows


def half(part: int) -> RowsFn:
    """Part `part` of a projection laid out [gate | up] (Phi-3 gate_up_proj)."""

    def rows(config) -> list[int]:
        width = config.intermediate_size
        return list(range(part * width, (part + 1) * width))

    return rows


LLAMA = {
    "q": Target("self_attn.q_proj"),
    "k": Target("self_attn.k_proj"),
    "v": Target("self_attn.v_proj"),
    "o": Target("self_attn.o_proj"),
    "gate": Target("mlp.gate_proj"),
    "up": Target("mlp.up_proj"),
    "down": Target("mlp.down_proj"),
}

ARCHITECTURES: dict[str, dict[str, Target]] = {
    "gpt2": {
        "q": Target("attn.c_attn", contiguous(0)),
        "k": Target("attn.c_attn", contiguous(1)),
        "v": Target("attn.c_attn", contiguous(2)),
        "o": Target("attn.c_proj"),
        "up": Target("mlp.c_fc"),
        "down": Target("mlp.c_proj"),
    },
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gpt_neox": {
        "q": Target("attention.query_key_value", per_head(0)),
        "k": Target("attention.query_key_value", per_head(1)),
        "v": Target("attention.query_key_value", per_head(2)),
        "o": Target("attention.dense"),
        "up": Target("mlp.dense_h_to_4h"),
        "down": Target("mlp.dense_4h_to_h"),
    },
    "bloom": {
        "q": Target("self_attention.query_key_value", per_head(0)),
        "k": Target("self_attention.query_key_value", per_head(1)),
        "v": Target("self_attention.query_key_value", per_head(2)),
        "o": Target("self_attention.dense"),
        "up": Target("mlp.dense_h_to_4h"),
        "down": Target("mlp.dense_4h_to_h"),
    },
    "opt": {
        "q": Target("self_attn.q_proj"),
        "k": Target("self_attn.k_proj"),
        "v": Target("self_attn.v_proj"),
        "o": Target("self_attn.out_proj"),
        "up": Target("fc1"),
        "down": Target("fc2"),
    },
    "phi3": {
        "q": Target("self_attn.qkv_proj", contiguous(0)),
        "k": Target("self_attn.qkv_proj", contiguous(1)),
        "v": Target("self_attn.qkv_proj", contiguous(2)),
        "o": Target("self_attn.o_proj"),
        "gate": Target("mlp.gate_up_proj", half(0)),
        "up": Target("mlp.gate_up_proj", half(1)),
        "down": Target("mlp.down_proj"),
    },
}


def architecture(model_type: str) -> dict[str, Target]:
    """The semantic targets of an architecture; empty for one the table does not know (module names still work)."""
    return ARCHITECTURES.get(model_type, {})
