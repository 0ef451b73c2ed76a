"""`lorafit export`: what it writes loads as the engine reads it, with the adapter's own effect.

Checked against independent computations: peft's own delta weights and logits, and llama.cpp's row order for
rotary q/k weights (convert_hf_to_gguf.py's permute, written out again here).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import (
    assert_same,
    build_tokenizer,
    logits,
    peft_logits,
    peft_written,
    saved_adapter,
    snapshot,
    tiny_config,
    tiny_model,
)
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorafit.adapter.export import export_adapter, readiness
from lorafit.cli import app

peft = pytest.importorskip("peft")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
gguf = pytest.importorskip("gguf")
runner = CliRunner()


def saved_base(arch: str, folder: Path, **changes) -> str:
    model = tiny_model(arch)
    for key, value in changes.items():
        setattr(model.config, key, value)
    model.save_pretrained(folder)
    return str(folder)


def peft_deltas(arch: str, adapter: Path) -> dict[str, torch.Tensor]:
    """Each adapted module's ΔW [d_out, d_in] as peft computes it, keyed by module path."""
    model = peft.PeftModel.from_pretrained(tiny_model(arch), adapter)
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in getattr(module, "lora_A", {}):
            delta = module.get_delta_weight("default")
            deltas[name.removeprefix("base_model.model.")] = delta.t() if module.fan_in_fan_out else delta
        elif isinstance(module, peft.tuners.lora.LoraLayer) and "default" in getattr(module, "lora_embedding_A", {}):
            deltas[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").t()
    return deltas


def llama_cpp_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute of a q/k weight's rows."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def test_one_alpha_export_keeps_every_modules_scaling(tmp_path, tokens):
    """rsLoRA with per-module ranks and alphas, as vLLM, SGLang and llama.cpp read it: one lora_alpha / r."""
    peft_written("llama", tmp_path / "adapter", use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3})
    base = saved_base("llama", tmp_path / "base")  # peft's adapter names no base: the rules need its config
    result = export_adapter(tmp_path / "adapter", "vllm", tmp_path / "out", base=base)
    assert result["written"] == "PEFT adapter" and [p["rule"] for p in result["problems"]] == ["scaling"]
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False
    expected = peft_deltas("llama", tmp_path / "adapter")
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for path, delta in expected.items():
        a, b = tensors[f"base_model.model.{path}.lora_A.weight"], tensors[f"base_model.model.{path}.lora_B.weight"]
        torch.testing.assert_close(config["lora_alpha"] / config["r"] * b @ a, delta, rtol=1e-5, atol=1e-6)
    # and peft, which reads the patterns, still gives the adapter's logits
    assert_same(peft_logits("llama", tmp_path / "out", tokens), peft_logits("llama", tmp_path / "adapter", tokens))


def test_plain_adapter_is_exported_for_vllm_byte_for_byte(tmp_path):
    saved_adapter("llama", tmp_path / "adapter")
    result = export_adapter(tmp_path / "adapter", "vllm", tmp_path / "out")
    assert result["problems"] == [] and result["ready_as_written"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "adapter" / name).read_bytes()


@pytest.mark.parametrize(("arch", "targets"), [("llama", ("q", "k", "v", "o", "embed")), ("gpt2", ("q", "v"))])
def test_gguf_adapter_reads_back_with_llama_cpp_names_shapes_and_alpha(tmp_path, arch, targets):
    saved_adapter(arch, tmp_path / "adapter", targets)
    base = saved_base(arch, tmp_path / "base")
    result = export_adapter(tmp_path / "adapter", "llamacpp", tmp_path / "out", base=base)
    assert result["written"] == "GGUF adapter"
    reader = gguf.GGUFReader(str(tmp_path / "out" / "adapter.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert fields == {"general.architecture": arch, "general.type": "adapter", "adapter.type": "lora",
                      "adapter.lora.alpha": pytest.approx(config["lora_alpha"])}
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    shapes = {t.name: list(t.shape) for t in reader.tensors}  # ggml's order: the numpy shape reversed
    hf = tiny_config(arch)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "c_attn": "attn_qkv"}

    def gguf_name(path: str) -> str:  # model.layers.N.self_attn.q_proj, transformer.h.N.attn.c_attn
        return "token_embd" if path.endswith("embed_tokens") else f"blk.{path.split('.')[2]}.{names[path.split('.')[-1]]}"

    expected = {gguf_name(path): (path, delta) for path, delta in peft_deltas(arch, tmp_path / "adapter").items()}
    assert set(tensors) == {f"{name}.weight.lora_{part}" for name in expected for part in "ab"}
    alpha = fields["adapter.lora.alpha"]
    for name, (path, delta) in expected.items():
        a, b = tensors[f"{name}.weight.lora_a"], tensors[f"{name}.weight.lora_b"]
        rank = b.shape[1]
        if name == "token_embd":  # llama.cpp gathers token rows of lora_a [vocab, r]; the table is [vocab, hidden]
            assert shapes[f"{name}.weight.lora_a"] == [rank, hf.vocab_size]
            torch.testing.assert_close(alpha / rank * a @ b.t(), delta.t(), rtol=1e-5, atol=1e-6)
            continue
        assert shapes[f"{name}.weight.lora_a"] == [delta.shape[1], rank]
        assert shapes[f"{name}.weight.lora_b"] == [rank, delta.shape[0]]
        rotary = {"q_proj": hf.num_attention_heads, "k_proj": hf.num_key_value_heads} if arch == "llama" else {}
        heads = rotary.get(path.split(".")[-1])
        want = llama_cpp_rows(delta, heads) if heads else delta
        torch.testing.assert_close(alpha / rank * b @ a, want, rtol=1e-5, atol=1e-6)


def test_gpt2_qv_adapter_for_vllm_is_refused_saying_why_and_merged_with_base(tmp_path, tokens):
    saved_adapter("gpt2", tmp_path / "adapter")  # q and v on the fused c_attn
    result = runner.invoke(app, ["export", str(tmp_path / "adapter"), "--for", "vllm", str(tmp_path / "out")])
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert "SupportsLoRA" in result.stderr and "c_attn" in result.stderr and "--base" in result.stderr

    base = saved_base("gpt2", tmp_path / "base")
    result = export_adapter(tmp_path / "adapter", "vllm", tmp_path / "out", base=base)
    assert result["written"] == "merged model" and result["serve"] == f"vllm serve {tmp_path / 'out'}"
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(merged, tokens), peft_logits("gpt2", tmp_path / "adapter", tokens),
                               rtol=1e-4, atol=1e-4)


def test_check_only_writes_nothing_and_says_whether_it_is_ready(tmp_path):
    saved_adapter("llama", tmp_path / "adapter")
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["export", str(tmp_path / "adapter"), "--for", "sglang", "--check-only", "--json"])
    assert result.exit_code == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["command"] == "export" and shown["refused"] is False and shown["written"] is None
    assert [p["rule"] for p in shown["problems"]] == ["rank"]  # SGLang's flags: a note
    assert snapshot(tmp_path) == before


def test_readiness_names_the_engines_that_load_the_adapter_as_written(tmp_path):
    saved_adapter("llama", tmp_path / "llama")
    saved_adapter("gpt2", tmp_path / "gpt2")
    llama = readiness(tmp_path / "llama")
    assert llama.startswith("serving: ready as written for vLLM, SGLang, peft; llama.cpp after `lorafit export")
    assert readiness(tmp_path / "gpt2", tiny_config("gpt2")).endswith("not as an adapter for vLLM, SGLang "
                                                        "(lorafit export --check-only says why)")


@pytest.fixture
def chat_base(tmp_path) -> Path:
    """A tiny Llama whose tokenizer has ChatML's tokens; its generation config stops at <|endoftext|> only."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.save_pretrained(tmp_path / "base")
    config = transformers.LlamaConfig(**{**tiny_config("llama").to_dict(), "vocab_size": len(tokenizer),
                                         "eos_token_id": tokenizer.eos_token_id})
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_chat_template_goes_beside_the_export_with_a_generation_config_that_stops_at_its_turn_end(tmp_path, chat_base):
    saved_adapter("llama", tmp_path / "adapter")
    (tmp_path / "adapter" / "chat_template.jinja").write_text(CHATML)
    result = export_adapter(tmp_path / "adapter", "vllm", tmp_path / "out", base=str(chat_base))
    end = transformers.AutoTokenizer.from_pretrained(chat_base).convert_tokens_to_ids("<|im_end|>")
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == CHATML
    written = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert end in written["eos_token_id"] and [p["level"] for p in result["problems"]] == ["fixed"]
    assert f"--generation-config {tmp_path / 'out'}" in result["serve"]

    transformers.GenerationConfig(eos_token_id=[0, end]).save_pretrained(chat_base)  # a base that already stops
    result = export_adapter(tmp_path / "adapter", "vllm", tmp_path / "again", base=str(chat_base))
    assert result["problems"] == [] and not (tmp_path / "again" / "generation_config.json").exists()
