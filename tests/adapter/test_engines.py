"""Each serving engine's rules, one table row per rule: an adapter that breaks it and one that keeps it.

Adapters are written here as files (adapter_config.json, adapter_model.safetensors) with small tensors, onto
base folders that hold only a config.json: the rules read nothing else.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file

from lorafit.adapter.engines import ENGINES, FIXED, MERGE, NOTE, REFUSE, check
from lorafit.adapter.export import read_adapter

HIDDEN, VOCAB = 32, 128
Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


def base_folder(tmp: Path, arch: str = "llama", **changes) -> str:
    folder = tmp / f"base-{arch}-{'-'.join(f'{k}{v}' for k, v in changes.items())}"
    if not folder.exists():
        config = tiny_config(arch)
        for key, value in changes.items():
            setattr(config, key, value)
        config.save_pretrained(folder)
    return str(folder)


def write_adapter(folder: Path, modules: dict[str, tuple], config: dict | None = None, extra: dict | None = None,
                  facts: dict | None = None) -> Path:
    """modules: path -> (rank, d_in, d_out, kind); kind "linear", "embedding" or "dora"."""
    tensors = {}
    for path, (rank, d_in, d_out, kind) in modules.items():
        a, b = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        tensors[f"base_model.model.{path}.{a}"] = torch.randn(rank, d_in)
        tensors[f"base_model.model.{path}.{b}"] = torch.randn(d_out, rank)
        if kind == "dora":
            tensors[f"base_model.model.{path}.lora_magnitude_vector"] = torch.rand(d_out)
    tensors.update(extra or {})
    rank = next(iter(modules.values()))[0]
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none", "use_rslora": False,
                "target_modules": sorted({path.split(".")[-1] for path in modules}), "init_lora_weights": True,
                **(config or {})}
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    if facts is not None:
        (folder / "lorafit.json").write_text(json.dumps(facts))
    return folder


QV = {Q: (8, HIDDEN, HIDDEN, "linear"), V: (8, HIDDEN, 16, "linear")}
QV_RANKS = {Q: (8, HIDDEN, HIDDEN, "linear"), V: (4, HIDDEN, 16, "linear")}
EMBED = {"model.embed_tokens": (8, VOCAB, HIDDEN, "embedding")}
HEAD = {"lm_head": (8, HIDDEN, VOCAB, "linear")}
GPT2_QV = {"transformer.h.0.attn.c_attn": (16, HIDDEN, 3 * HIDDEN, "linear")}

# (engine, rule, level, the adapter that breaks the rule, the one that keeps it); an adapter is
# (modules, config changes, base: (arch, config changes) or None, extra: "saved"/"added"/"nf4" or None).
RULES = [
    *[(engine, "experts", REFUSE, (QV, {"target_parameters": ["mlp.experts.gate_up_proj"]}, ("llama", {}), None),
       (QV, {}, ("llama", {}), None)) for engine in ENGINES],
    ("vllm", "architecture", MERGE, (GPT2_QV, {}, ("gpt2", {}), None), (QV, {}, ("llama", {}), None)),
    ("sglang", "architecture", MERGE, (GPT2_QV, {}, ("gpt2", {}), None), (QV, {}, ("qwen2", {}), None)),
    ("llamacpp", "architecture", MERGE, (QV, {}, ("opt", {}), None), (QV, {}, ("qwen3", {}), None)),
    ("vllm", "modules", MERGE, ({**QV, **EMBED}, {}, ("qwen2", {}), None), ({**QV, **EMBED}, {}, ("llama", {}), None)),
    ("sglang", "modules", MERGE, ({**QV, "model.layers.0.mlp.fc1": (8, HIDDEN, 64, "linear")}, {}, ("llama", {}),
                                  None), (QV, {}, ("llama", {}), None)),
    ("llamacpp", "modules", MERGE, ({"transformer.wpe": (8, 64, HIDDEN, "embedding")}, {}, ("gpt2", {}), None),
     (GPT2_QV, {}, ("gpt2", {}), None)),
    *[(engine, "dora", MERGE, ({Q: (8, HIDDEN, HIDDEN, "dora")}, {"use_dora": True}, ("llama", {}), None),
       (QV, {}, ("llama", {}), None)) for engine in ("vllm", "sglang", "llamacpp")],
    *[(engine, "init", REFUSE, (QV, {"init_lora_weights": "pissa"}, ("llama", {}), None),
       (QV, {"init_lora_weights": "gaussian"}, ("llama", {}), None)) for engine in ("vllm", "sglang", "llamacpp")],
    *[(engine, "bias", REFUSE, (QV, {"bias": "lora_only"}, ("llama", {}), None), (QV, {}, ("llama", {}), None))
      for engine in ("vllm", "sglang", "llamacpp")],
    *[(engine, "saved-modules", REFUSE, (QV, {"modules_to_save": ["lm_head"]}, ("llama", {}), "saved"),
       (QV, {}, ("llama", {}), None)) for engine in ("vllm", "sglang", "llamacpp")],
    *[(engine, "vocabulary", REFUSE, ({"model.embed_tokens": (8, VOCAB + 4, HIDDEN, "embedding")}, {},
                                      ("llama", {}), None), (EMBED, {}, ("llama", {}), None))
      for engine in ("vllm", "llamacpp")],
    ("vllm", "vocabulary", REFUSE, (QV, {}, ("llama", {}), "added"), (QV, {}, ("llama", {}), None)),
    ("sglang", "vocabulary", NOTE, (QV, {}, ("llama", {}), "added"), (QV, {}, ("llama", {}), None)),
    ("vllm", "rank", MERGE, ({Q: (1024, HIDDEN, HIDDEN, "linear")}, {}, ("llama", {}), None),
     ({Q: (16, HIDDEN, HIDDEN, "linear")}, {}, ("llama", {}), None)),
    ("vllm", "rank", NOTE, ({Q: (32, HIDDEN, HIDDEN, "linear")}, {}, ("llama", {}), None),
     ({Q: (16, HIDDEN, HIDDEN, "linear")}, {}, ("llama", {}), None)),
    # one lora_alpha / r for every module: SGLang knows no rsLoRA, vLLM does; llama.cpp divides by each pair's rank
    ("sglang", "scaling", FIXED, (QV, {"use_rslora": True}, ("llama", {}), None), (QV, {}, ("llama", {}), None)),
    ("vllm", "scaling", FIXED, (QV_RANKS, {"rank_pattern": {"v_proj": 4}}, ("llama", {}), None),
     (QV, {"use_rslora": True}, ("llama", {}), None)),
    ("llamacpp", "scaling", FIXED, (QV, {"alpha_pattern": {"v_proj": 4}}, ("llama", {}), None),
     (QV_RANKS, {"rank_pattern": {"v_proj": 4}}, ("llama", {}), None)),
    *[(engine, "scaling", FIXED, (QV, {"alpha_pattern": {"v_proj": 4}}, ("llama", {}), None),
       (QV, {}, ("llama", {}), None)) for engine in ("vllm", "sglang")],
    *[("llamacpp", "tied-embeddings", MERGE, ({**QV, **adapted}, {}, ("llama", {"tie_word_embeddings": True}), None),
       ({**QV, **adapted}, {}, ("llama", {}), None)) for adapted in (HEAD, EMBED)],
    ("llamacpp", "base", REFUSE, (QV, {}, None, None), (QV, {}, ("llama", {}), None)),
    ("sglang", "embeddings", NOTE, ({**QV, **EMBED}, {}, ("llama", {}), None), (QV, {}, ("llama", {}), None)),
    *[(engine, "qlora", NOTE, (QV, {}, ("llama", {}), "nf4"), (QV, {}, ("llama", {}), None)) for engine in ENGINES],
]


def build(tmp: Path, name: str, spec) -> tuple:
    modules, config, base, extra = spec
    tensors = {"base_model.model.lm_head.modules_to_save.default.weight": torch.randn(VOCAB, HIDDEN)} \
        if extra == "saved" else {}
    facts = {"model_type": "llama"} if base is None else None
    if extra == "nf4":
        facts = {"extra": {"recipe": {"model": {"quantize": "nf4"}}}}
    folder = write_adapter(tmp / name, modules, config, tensors, facts)
    if extra == "added":
        (folder / "added_tokens.json").write_text(json.dumps({"<tool>": VOCAB, "</tool>": VOCAB + 1}))
    return folder, None if base is None else base_folder(tmp, base[0], **base[1])


@pytest.mark.parametrize(("engine", "rule", "level", "breaks", "keeps"), RULES,
                         ids=[f"{row[0]}-{row[1]}-{row[2]}-{i}" for i, row in enumerate(RULES)])
def test_each_engine_rule_flags_the_adapter_that_breaks_it_and_not_the_one_that_keeps_it(
        tmp_path, engine, rule, level, breaks, keeps):
    found = {}
    for name, spec in (("breaks", breaks), ("keeps", keeps)):
        folder, base = build(tmp_path, name, spec)
        found[name] = [(p.rule, p.level) for p in check(read_adapter(folder, base), ENGINES[engine])]
    assert (rule, level) in found["breaks"], found["breaks"]
    assert rule not in {r for r, _ in found["keeps"]}, found["keeps"]


def test_vllm_refuses_a_gpt2_adapter_saying_why(tmp_path):
    folder, base = build(tmp_path, "gpt2", (GPT2_QV, {}, ("gpt2", {}), None))
    (problem,) = [p for p in check(read_adapter(folder, base), ENGINES["vllm"]) if p.rule == "architecture"]
    assert "SupportsLoRA" in problem.text and "c_attn" in problem.text


def test_a_plain_llama_adapter_needs_nothing_for_vllm_or_peft(tmp_path):
    folder, base = build(tmp_path, "plain", (QV, {}, ("llama", {}), None))
    adapter = read_adapter(folder, base)
    assert check(adapter, ENGINES["vllm"]) == []
    assert check(adapter, ENGINES["peft"]) == []
