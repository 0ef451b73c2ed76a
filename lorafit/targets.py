"""Where each architecture keeps its projections: semantic targets (q, k, v, o, gate, up, down) -> modules.

One row of ARCHITECTURES per `config.model_type`. A target names a module by its path suffix inside a
block; for a fused projection it also gives the output features that belong to it, so that "q and v" on
GPT-2's c_attn adapts exactly the q and v features and leaves k alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

SEMANTIC_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

FeaturesFn = Callable[[object], list[int]]


@dataclass(frozen=True)
class Target:
    module: str  # path suffix inside a block, e.g. "attn.c_attn"
    features: FeaturesFn | None = None  # output features of a fused projection; None = the whole module


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _qkv_sizes(config) -> tuple[int, int, int]:
    """Output widths of q, k and v (k and v are narrower under grouped-query attention)."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = _head_dim(config)
    return config.num_attention_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim


def contiguous(part: int) -> FeaturesFn:
    """Part `part` of a projection laid out [q | k | v] (GPT-2 c_attn, Phi-3 qkv_proj)."""

    def features(config) -> list[int]:
        sizes = _qkv_sizes(config)
        start = sum(sizes[:part])
        return list(range(start, start + sizes[part]))

    return features


def per_head(part: int) -> FeaturesFn:
    """Part `part` of a projection interleaved per head, [head, (q, k, v), head_dim] (GPT-NeoX, BLOOM)."""

    def features(config) -> list[int]:
        head_dim = _head_dim(config)
        return [
            (head * 3 + part) * head_dim + i for head in range(config.num_attention_heads) for i in range(head_dim)
        ]

    return features


def half(part: int) -> FeaturesFn:
    """Part `part` of a projection laid out [gate | up] (Phi-3 gate_up_proj)."""

    def features(config) -> list[int]:
        width = config.intermediate_size
        return list(range(part * width, (part + 1) * width))

    return features


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


def matches_suffix(path: str, suffix: str) -> bool:
    """peft's rule, and ours: a module is named by its whole dotted path or by a dotted suffix of it."""
    return path == suffix or path.endswith("." + suffix)


def fused_slices(config, names: list[str]) -> dict[str, list[int]] | None:
    """Output features of each named fused-projection target, in feature order; None unless all are such targets.

    Feature order, not request order, so that ["v", "q"] and ["q", "v"] give the same adapter layout.
    """
    table = architecture(getattr(config, "model_type", ""))
    if not names or any(name not in table or table[name].features is None for name in names):
        return None
    slices = {name: table[name].features(config) for name in names}
    return dict(sorted(slices.items(), key=lambda item: min(item[1])))
