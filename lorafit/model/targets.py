"""Where each architecture keeps its projections: semantic targets (q, k, v, o, gate, up, down) -> modules.

One row of ARCHITECTURES per `config.model_type`. A target names a module by its path suffix inside a
block; for a fused projection it also gives the output features that belong to it, so that "q and v" on
GPT-2's c_attn adapts exactly the q and v features and leaves k alone.

Mixture-of-experts layers in transformers 5 keep their experts as stacked 3-D parameters of one module
(`mlp.experts.gate_up_proj` [experts, 2·ffn, hidden], `mlp.experts.down_proj` [experts, hidden, ffn]), named
alike in every family: EXPERT_PARAMETERS says which semantic target each stack belongs to, whatever the row.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

SEMANTIC_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "gate_up")


ALL_LINEAR = "all-linear"  # peft's name: every linear projection except the output head


EMBED = "embed"  # the input embedding table


EXPERTS = "experts"  # every stacked expert weight of a mixture-of-experts model


# Semantic target -> the name of a stacked [experts, ., .] weight it takes in every MoE layer (the same in every
# transformers 5 family). The experts' gate and up are one stacked parameter, adapted together as "gate_up".
EXPERT_PARAMETERS = {"gate_up": "gate_up_proj", "up": "up_proj", "down": "down_proj"}


FeaturesFn = Callable[[object], list[int]]


@dataclass(frozen=True)
class Target:
    module: str  # path suffix inside a block, e.g. "attn.c_attn"
    features: FeaturesFn | None = None  # output features of a fused projection; None = the whole module


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _qkv_sizes(config, kv_heads: int | None = None) -> tuple[int, int, int]:
    """Output widths of q, k and v (k and v are narrower under grouped-query attention)."""
    kv_heads = kv_heads or getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = _head_dim(config)
    return config.num_attention_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim


def contiguous(part: int, kv_heads: int | None = None) -> FeaturesFn:
    """Part `part` of a projection laid out [q | k | v] (GPT-2 c_attn, Phi-3 qkv_proj); `kv_heads` overrides the config's."""

    def features(config) -> list[int]:
        sizes = _qkv_sizes(config, kv_heads)
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


def latent_kv(part: int) -> FeaturesFn:
    """Part `part` (0: k without rotary features, 1: v) of DeepSeek's kv_b_proj, laid out per head as
    [head, (qk_nope_head_dim of k, v_head_dim of v)]. It up-projects the compressed latent; k's rotary features
    come from kv_a_proj_with_mqa, shared by all heads, and are not part of it."""

    def features(config) -> list[int]:
        widths = (config.qk_nope_head_dim, config.v_head_dim)
        start, head = sum(widths[:part]), sum(widths)
        return [h * head + start + i for h in range(config.num_attention_heads) for i in range(widths[part])]

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


ATTENTION = {name: LLAMA[name] for name in ("q", "k", "v", "o")}


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
    "gemma3_text": LLAMA,
    # Mixture-of-experts families: attention as Llama's, and the experts' stacks through EXPERT_PARAMETERS; gate, up
    # and down also name the dense MLPs of a family that has some (Qwen3-MoE's mlp_only_layers).
    "qwen3_moe": LLAMA,
    "mixtral": ATTENTION,
    "olmoe": ATTENTION,
    "gpt_oss": ATTENTION,
    # Multi-head latent attention: q is the query's up-projection q_b_proj (after its low-rank q_a_proj), k and v
    # are their features of the latent's up-projection kv_b_proj. The dense MLPs of the first layers and the
    # shared experts are gate_proj, up_proj and down_proj.
    "deepseek_v3": {
        "q": Target("self_attn.q_b_proj"),
        "k": Target("self_attn.kv_b_proj", latent_kv(0)),
        "v": Target("self_attn.kv_b_proj", latent_kv(1)),
        "o": Target("self_attn.o_proj"),
        "gate": Target("gate_proj"),
        "up": Target("up_proj"),
        "down": Target("down_proj"),
    },
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


# Module names that Llama-shaped models without a table row use, in order of preference.
CONVENTIONAL = {
    "q": ("q_proj",),
    "k": ("k_proj",),
    "v": ("v_proj",),
    "o": ("o_proj", "out_proj"),
    "gate": ("gate_proj",),
    "up": ("up_proj", "dense_h_to_4h", "fc1"),
    "down": ("down_proj", "dense_4h_to_h", "fc2"),
}


FUSED_QKV = {"qkv_proj": "contiguous", "Wqkv": "contiguous", "query_key_value": "grouped"}


def grouped(part: int, kv_heads: int) -> FeaturesFn:
    """Part `part` of a projection laid out per key/value group, [group, (q heads of the group, k, v), head_dim].

    With one query head per group this is GPT-NeoX's per-head layout; with one group, [q | k | v] (Falcon).
    """

    def features(config) -> list[int]:
        head_dim, heads = _head_dim(config), config.num_attention_heads
        per_group = heads // kv_heads
        widths = (per_group * head_dim, head_dim, head_dim)
        start = sum(widths[:part])
        group = sum(widths)
        return [g * group + start + i for g in range(kv_heads) for i in range(widths[part])]

    return features


def conventional_targets(config, widths: dict[str, int]) -> dict[str, Target]:
    """Semantic targets for an architecture the table lacks, from the conventional names of its projections.

    `widths` maps each projection's last name to its output width. A fused q/k/v projection counts only when its
    width is q + k + v for the config's heads: the number of key/value heads is read off that width.
    """
    found = {}
    for name, candidates in CONVENTIONAL.items():
        present = [module for module in candidates if module in widths]
        if present:
            found[name] = Target(present[0])
    fused = next((n for n in FUSED_QKV if n in widths), None)
    if fused is not None and not {"q", "k", "v"} & found.keys():
        layout = _fused_layout(config, fused, widths[fused])
        if layout is not None:
            found.update({name: Target(fused, layout(i)) for i, name in enumerate(("q", "k", "v"))})
    return found


def _fused_layout(config, name: str, width: int) -> Callable[[int], FeaturesFn] | None:
    heads = getattr(config, "num_attention_heads", None)
    if not heads or not getattr(config, "hidden_size", None):
        return None
    head_dim = _head_dim(config)
    extra, rest = divmod(width - heads * head_dim, 2 * head_dim)
    if rest or extra <= 0 or heads % extra:
        return None  # not q + k + v of this config's heads: not a layout we can vouch for
    kv_heads = extra
    if FUSED_QKV[name] == "grouped":
        return lambda part: grouped(part, kv_heads)
    return lambda part: contiguous(part, kv_heads)


def semantic_targets(config, widths: dict[str, int]) -> dict[str, Target]:
    """The table's row for this model type, else the targets its conventional module names give."""
    row = architecture(getattr(config, "model_type", ""))
    return row or conventional_targets(config, widths)


def matches_suffix(path: str, suffix: str) -> bool:
    """peft's rule, and ours: a module is named by its whole dotted path or by a dotted suffix of it."""
    return path == suffix or path.endswith("." + suffix)


def fused_slices(config, names: list[str], table: dict[str, Target] | None = None) -> dict[str, list[int]] | None:
    """Output features of each named fused-projection target, in feature order; None unless all are such targets.

    Feature order, not request order, so that ["v", "q"] and ["q", "v"] give the same adapter layout.
    `table` is the model's semantic targets (default: its row in ARCHITECTURES).
    """
    table = architecture(getattr(config, "model_type", "")) if table is None else table
    if not names or any(name not in table or table[name].features is None for name in names):
        return None
    slices = {name: table[name].features(config) for name in names}
    return dict(sorted(slices.items(), key=lambda item: min(item[1])))
