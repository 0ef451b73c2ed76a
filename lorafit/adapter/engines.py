"""What each serving engine does with a PEFT LoRA adapter: one Engine row each, and one small function per rule.

From the engines' own code: vLLM's lora/peft_helper.py (DoRA, bias, modules_to_save, inits, max rank) and
lora_model.py (every tensor's module, by its last name, must be one the model wraps; fused projections are
packed from per-projection names through the model's packed_modules_mapping); SGLang's lora/utils.py (target
names normalised by their last component: q/k/v -> qkv_proj, gate/up -> gate_up_proj) and lora.py (one scaling,
lora_alpha / r, for every module); llama.cpp's convert_lora_to_gguf.py and src/llama-adapter.cpp (lora_a/lora_b
pairs only, one adapter.lora.alpha with the runtime scale alpha / rank, lm_head LoRA refused on a tied model).
LoRA on MoE experts goes to peft only; the others get the merged model (NO_EXPERT_LORA says why).
A rule returns Problems; the level says what export does about each.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorafit.adapter.gguf import ARCHITECTURES as GGUF_ARCHITECTURES

if TYPE_CHECKING:
    from lorafit.adapter.export import Adapter

REFUSE = "refuse"  # the engine would refuse or mis-apply it, and nothing export writes changes that: exit 2
MERGE = "merge"  # refused as an adapter; with --base, export writes the merged model, which the engine serves
FIXED = "fixed"  # the adapter as written would fail; what export writes loads
NOTE = "note"  # only degrades, or depends on how the server is started


@dataclass(frozen=True)
class Problem:
    rule: str
    level: str
    text: str  # what is wrong and, for REFUSE and NOTE, what to do


@dataclass(frozen=True)
class Engine:
    name: str  # as given to --for
    label: str
    kinds: frozenset[str]  # module kinds it applies LoRA to: linear, embedding, experts (target_parameters)
    modules: dict[str, frozenset[str]] | None  # model_type -> last names of the modules it wraps; None: any module
    one_alpha: bool = True  # one scaling for every module: per-module alphas must be folded into B
    rslora: bool = False  # honours use_rslora (alpha/sqrt(r)); else it is folded into B too
    dora: bool = False
    plain_only: bool = True  # LoRA A/B pairs only: no biases, saved modules, trainable tokens or PiSSA-style inits
    added_vocab: bool = False
    max_ranks: tuple[int, ...] = ()  # the values its max-rank flag accepts; empty: any rank
    default_rank: int = 0
    gguf: bool = False  # loads GGUF adapters converted against the base's config
    tied_embeddings: bool = True  # applies embedding or lm_head LoRA on a model whose lm_head is its embedding table
    embedding_note: str = ""


PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
EMBEDDINGS = frozenset({"embed_tokens", "lm_head"})
PHI3 = frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}) | EMBEDDINGS  # HF's Phi-3 fuses them itself

ENGINES = {
    "vllm": Engine(
        "vllm", "vLLM", frozenset({"linear", "embedding"}),
        # LlamaForCausalLM (also Mistral's) and Phi3ForCausalLM list embedding_modules; Qwen2/3 and OPT do not.
        # GPT-2, GPT-NeoX and BLOOM do not implement SupportsLoRA at all.
        modules={"llama": PROJECTIONS | EMBEDDINGS, "mistral": PROJECTIONS | EMBEDDINGS, "phi3": PHI3,
                 "qwen2": PROJECTIONS, "qwen3": PROJECTIONS,
                 "opt": frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"})},
        max_ranks=(1, 8, 16, 32, 64, 128, 256, 320, 512), default_rank=16, rslora=True,
    ),
    "sglang": Engine(
        "sglang", "SGLang", frozenset({"linear", "embedding"}),
        modules={"llama": PROJECTIONS | EMBEDDINGS, "mistral": PROJECTIONS | EMBEDDINGS, "qwen2": PROJECTIONS | EMBEDDINGS,
                 "qwen3": PROJECTIONS | EMBEDDINGS, "phi3": PHI3},
        added_vocab=True,
        embedding_note="SGLang applies embed_tokens/lm_head LoRA only with the LoRA backends that implement it; "
                       "start the server with --lora-target-modules naming them and check its log",
    ),
    "llamacpp": Engine(
        "llamacpp", "llama.cpp", frozenset({"linear", "embedding"}),
        modules={model_type: names for model_type, (_, names, _) in GGUF_ARCHITECTURES.items()},
        gguf=True, tied_embeddings=False,
    ),
    "peft": Engine("peft", "peft", frozenset({"linear", "embedding", "experts"}), modules=None, one_alpha=False,
                   dora=True, plain_only=False, added_vocab=True),
}


# Why an engine is not trusted with LoRA on a mixture-of-experts model's stacked experts (peft's target_parameters:
# lora_A [experts·r, d_in], lora_B [d_out, r·experts] per stack). The merged model serves everywhere instead.
NO_EXPERT_LORA = {
    "vllm": "vLLM's fused-MoE LoRA reads that layout only on models that declare it (is_3d_moe_weight), and as of "
            "August 2026 reads peft's tensors there with the wrong shapes (vllm-project/vllm#52198, open)",
    "sglang": "SGLang releases before sgl-project/sglang#25528 do not read peft's target_parameters tensors and "
              "leave the experts unadapted without a word, and lorafit cannot tell which one will serve it",
    "llamacpp": "lorafit's GGUF writer maps no expert tensors to llama.cpp's stacked ffn_*_exps names",
}


# Why an engine refuses every adapter for a model type, where lorafit knows more than "no LoRA support".
WHY_NOT = {
    ("vllm", "gpt2"): "vLLM's GPT2LMHeadModel implements no SupportsLoRA (its fused c_attn is a QKVParallelLinear "
                      "with no packed_modules_mapping to split q/v LoRA by), so it refuses every GPT-2 adapter, "
                      "fused or not",
    ("sglang", "gpt2"): "SGLang wraps only modules named like Llama's (qkv_proj, o_proj, gate_up_proj, down_proj), "
                        "and GPT-2's are c_attn, c_proj and c_fc",
}

# The rules about serving the adapter itself, which say nothing once a merged model is written instead.
ADAPTER_FORM = {"rank", "scaling", "gguf", "embeddings"}


def check(adapter: Adapter, engine: Engine) -> list[Problem]:
    """Every problem `engine` has with `adapter`, rule by rule; modules of a kind it cannot take stop the rest."""
    return _kinds(adapter, engine) or [problem for rule in RULES for problem in rule(adapter, engine)]


def _kinds(adapter: Adapter, engine: Engine) -> list[Problem]:
    missing = sorted(set(adapter.kinds.values()) - engine.kinds)
    if "experts" in missing:
        stacks = sorted(name for name, kind in adapter.kinds.items() if kind == "experts")
        why = NO_EXPERT_LORA.get(engine.name, f"{engine.label} applies no LoRA to them")
        return [Problem("experts", MERGE, f"the adapter adapts the MoE experts' stacks ({', '.join(stacks)}), and "
                        f"{engine.label} cannot be relied on to apply them: {why}")]
    return [Problem("kinds", REFUSE, f"{engine.label} applies no LoRA to {', '.join(missing)} modules")] if missing else []


def _architecture(adapter: Adapter, engine: Engine) -> list[Problem]:
    if engine.modules is None:
        return []
    if adapter.model_type is None:
        return [Problem("architecture", REFUSE, f"the base model's architecture is unknown, and {engine.label}'s "
                        "support depends on it; pass --base BASE (a model folder; its config.json is enough)")]
    names = engine.modules.get(adapter.model_type)
    if names is None:
        why = "lorafit does not write GGUF adapters for it yet" if engine.gguf else WHY_NOT.get(
            (engine.name, adapter.model_type), f"its {adapter.model_type} model implements no LoRA, so it refuses "
                                               "every adapter for it")
        return [Problem("architecture", MERGE, f"{engine.label} cannot apply this adapter to a {adapter.model_type} "
                        f"model: {why}")]
    unknown = sorted({path for path in adapter.modules if path.split(".")[-1] not in names})
    if not unknown:
        return []
    return [Problem("modules", MERGE, f"{engine.label}'s {adapter.model_type} model applies LoRA only to "
                    f"{', '.join(sorted(names))}; this adapter also adapts {_few(unknown)}")]


def _dora(adapter: Adapter, engine: Engine) -> list[Problem]:
    if not adapter.has_magnitudes or engine.dora:
        return []
    return [Problem("dora", MERGE, f"{engine.label} does not apply DoRA (its magnitude vectors would be refused or "
                    "dropped), and DoRA cannot be rewritten as a plain LoRA")]


def _init(adapter: Adapter, engine: Engine) -> list[Problem]:
    init = adapter.config.get("init_lora_weights", True)
    if not engine.plain_only or init in (True, False) or str(init).lower() in ("gaussian", "eva", "orthogonal"):
        return []  # peft itself redoes such an init from the base when it loads the adapter
    return [Problem("init", REFUSE, f"the adapter was initialised with {init!r} and saved against the residual base "
                    f"that {init!r} leaves, not the base {engine.label} serves; convert it to a plain LoRA against "
                    "the original base with peft (path_initial_model_for_weight_conversion) and export that")]


def _bias(adapter: Adapter, engine: Engine) -> list[Problem]:
    bias = adapter.config.get("bias", "none") or "none"
    if not engine.plain_only or (bias == "none" and not adapter.config.get("lora_bias")):
        return []
    what = f"bias={bias!r}" if bias != "none" else "lora_bias"
    return [Problem("bias", REFUSE, f"the adapter trains biases ({what}), which {engine.label} does not load; "
                    "retrain with bias='none'")]


def _saved_modules(adapter: Adapter, engine: Engine) -> list[Problem]:
    saved = [key for key in ("modules_to_save", "trainable_token_indices") if adapter.config.get(key)]
    if not engine.plain_only or not (saved or adapter.extra):
        return []
    what = ", ".join(saved) if saved else f"tensors that are not LoRA pairs ({_few(adapter.extra)})"
    return [Problem("saved-modules", REFUSE, f"the adapter carries {what}; {engine.label} loads LoRA A/B pairs only "
                    "(llama.cpp's converter aborts on full tensors); retrain without modules_to_save")]


def _vocabulary(adapter: Adapter, engine: Engine) -> list[Problem]:
    embedded = any(kind == "embedding" or "table" in parts for kind, parts in adapter.modules.values())
    if adapter.vocab_size is None and embedded and not engine.added_vocab:
        return [Problem("vocabulary", NOTE, "the base's vocabulary is unknown, so whether the adapter adds tokens "
                        f"({engine.label} loads none) was not checked; pass --base BASE")]
    added = adapter.added_tokens()
    if not added:
        return []
    text = f"the adapter adds {added} token(s) to the base's vocabulary of {adapter.vocab_size}"
    if engine.added_vocab:
        return [Problem("vocabulary", NOTE, f"{text}; serve it with the adapter's own tokenizer")]
    return [Problem("vocabulary", REFUSE, f"{text}, which {engine.label} does not load; merge it into a model "
                    "with the resized vocabulary instead (peft: merge_and_unload, then save with the tokenizer)")]


def _rank(adapter: Adapter, engine: Engine) -> list[Problem]:
    rank = max(adapter.ranks().values())
    if engine.name == "sglang":
        return [Problem("rank", NOTE, f"start SGLang with --max-lora-rank {rank} or more, and --lora-target-modules "
                        f"{' '.join(sorted(adapter.normalized_targets()))}")]
    if not engine.max_ranks:
        return []
    if rank > engine.max_ranks[-1]:
        return [Problem("rank", MERGE, f"rank {rank} is above {engine.max_ranks[-1]}, the largest --max-lora-rank "
                        f"{engine.label} accepts")]
    if rank <= engine.default_rank:
        return []
    flag = next(r for r in engine.max_ranks if r >= rank)
    return [Problem("rank", NOTE, f"rank {rank} is above {engine.label}'s default --max-lora-rank "
                    f"{engine.default_rank}; start it with --max-lora-rank {flag}")]


def scaling_folds(adapter: Adapter, engine: Engine) -> list[str]:
    """What of the adapter's scalings `engine`'s one lora_alpha cannot say, so export folds it into lora_B."""
    if not engine.one_alpha:
        return []
    rslora = adapter.config.get("use_rslora") and not (engine.rslora or engine.gguf)  # GGUF: alpha absorbs it
    folds = ["rsLoRA (alpha/sqrt(r))"] if rslora else []
    _, factors = adapter.folding(per_rank=engine.gguf)
    if any(abs(factor - 1) > 1e-6 for factor in factors.values()):
        folds.append("modules scaled differently (rank_pattern/alpha_pattern)")  # older vLLM and SGLang read neither
    return folds


def _scaling(adapter: Adapter, engine: Engine) -> list[Problem]:
    folds = scaling_folds(adapter, engine)
    if not folds:
        return []
    return [Problem("scaling", FIXED, f"{engine.label} scales every module by one lora_alpha over its rank, and this "
                    f"adapter uses {' and '.join(folds)}: written with each module's scaling folded into lora_B")]


def _tied_embeddings(adapter: Adapter, engine: Engine) -> list[Problem]:
    """llama.cpp serves a tied base's output from the token embedding's own tensor: its converter refuses lm_head
    LoRA, and an embedding LoRA would also be applied, with the wrong shapes, to the output (an abort)."""
    adapted = sorted({path.split(".")[-1] for path, (kind, _) in adapter.modules.items()
                      if kind == "embedding" or path.split(".")[-1] == "lm_head"})
    if engine.tied_embeddings or not adapted or not adapter.tied:
        return []
    return [Problem("tied-embeddings", MERGE, f"the adapter adapts {' and '.join(adapted)}, and this base ties its "
                    f"output to its embedding table, which {engine.label} keeps as one tensor: it cannot apply "
                    "a LoRA to one use of it")]


def _gguf(adapter: Adapter, engine: Engine) -> list[Problem]:
    if not engine.gguf:
        return []
    if adapter.base is None:
        return [Problem("base", REFUSE, f"{engine.label}'s adapter file is converted against the base model's config "
                        "(architecture, heads, tensor names); pass --base BASE (its config.json is enough)")]
    return [Problem("gguf", FIXED, f"{engine.label} loads GGUF LoRA adapters, not PEFT folders: written as "
                    "adapter.gguf (tensors renamed, q/k rows in llama.cpp's rotary order where it has one)")]


def _embeddings(adapter: Adapter, engine: Engine) -> list[Problem]:
    embedded = any(path.split(".")[-1] in EMBEDDINGS for path in adapter.modules)
    return [Problem("embeddings", NOTE, engine.embedding_note)] if embedded and engine.embedding_note else []


def _quantized(adapter: Adapter, engine: Engine) -> list[Problem]:
    quantize = adapter.recipe.get("model", {}).get("quantize") or "none"
    if quantize == "none":
        return []
    return [Problem("qlora", NOTE, f"the adapter was trained on a {quantize} (4-bit) base; on a bf16/fp16 base its "
                    "outputs differ from training's by the quantization error: evaluate it on the base you serve "
                    "(lorafit eval --adapter)")]


def _few(items: list[str], shown: int = 3) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


RULES: list[Callable[[Adapter, Engine], list[Problem]]] = [
    _architecture, _dora, _init, _bias, _saved_modules, _vocabulary, _rank, _scaling, _tied_embeddings, _gguf,
    _embeddings, _quantized,
]
