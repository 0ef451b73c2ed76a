"""llama.cpp's LoRA adapter file, written with gguf (llama.cpp's own Python library) as convert_lora_to_gguf.py
writes it, without llama.cpp's repository.

The file holds general.architecture (the base's llama.cpp architecture), general.type "adapter", adapter.type
"lora", adapter.lora.alpha, and a pair `<base tensor>.lora_a` / `.lora_b` per module, named after the base's
GGUF tensors (blk.N.attn_q.weight). llama.cpp (src/llama-adapter.cpp) checks each pair against the base tensor
in ggml's order, ne = reversed numpy shape: lora_a [r, d_in] and lora_b [d_out, r] as numpy arrays, except the
token embedding, whose lora_a is [vocab, r] (rows are gathered by token id). It scales a pair by alpha / rank,
rank being that pair's own, so every module's own scaling is folded into its lora_b.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lorafit.errors import LorafitError

if TYPE_CHECKING:
    from lorafit.adapter.export import Adapter

_LLAMA = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
                    "lm_head"})
_PHI3 = frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head"})
_ROTARY = ("q_proj", "k_proj")  # the rows convert_hf_to_gguf.py reorders for llama.cpp's rotary embedding

# model_type -> (llama.cpp architecture, last names of the modules whose LoRA its graph applies, rows reordered).
# Qwen2/3 and Phi-3 rotate halves (NeoX style) as transformers does, so their rows stay; GPT-2 has no rotary.
ARCHITECTURES: dict[str, tuple[str, frozenset[str], tuple[str, ...]]] = {
    "llama": ("llama", _LLAMA, _ROTARY),
    "mistral": ("llama", _LLAMA, _ROTARY),  # convert_hf_to_gguf.py converts MistralForCausalLM as Llama
    "qwen2": ("qwen2", _LLAMA, ()),
    "qwen3": ("qwen3", _LLAMA, ()),
    "phi3": ("phi3", _PHI3, ()),
    "gpt2": ("gpt2", frozenset({"c_attn", "c_proj", "c_fc", "wte", "lm_head"}), ()),
}


def require_gguf():
    try:
        import gguf
    except ImportError as error:
        raise LorafitError("--for llamacpp writes GGUF with the gguf package; pip install 'lorafit[export]'") from error
    return gguf


def rotary_rows(b: torch.Tensor, heads: int) -> torch.Tensor:
    """B's output rows in the order convert_hf_to_gguf.py gives q/k weights: each head's two rotary halves
    interleaved ([h, 2, d/2] -> [h, d/2, 2]), llama.cpp's rotary pairing being adjacent elements."""
    rows = b.shape[0]
    return b.reshape(heads, 2, rows // heads // 2, *b.shape[1:]).transpose(1, 2).reshape(b.shape)


def gguf_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """{GGUF tensor name: fp32 tensor in numpy's (row-major) shape} for every LoRA pair of the adapter."""
    gguf = require_gguf()
    config = adapter.base
    arch, _, rotary = ARCHITECTURES[config.model_type]
    names = gguf.get_tensor_name_map(_arch(gguf, arch), config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads,
             "k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    _, factors = adapter.folding(per_rank=True)  # llama.cpp scales each pair by alpha / its own rank
    tensors = {}
    for path, (kind, parts) in sorted(adapter.modules.items()):
        name = names.get_name(path)
        if name is None:
            raise LorafitError(f"{path} has no tensor in llama.cpp's {arch} model; remove it from the adapter")
        a, b = parts["A"], parts["B"] * factors[path]
        last = path.split(".")[-1]
        if last in rotary:
            b = rotary_rows(b, heads[last])
        if kind == "embedding":
            a = a.t()  # llama.cpp gathers each token's row of lora_a: [vocab, r]
        tensors[f"{name}.weight.lora_a"] = a.float().contiguous()
        tensors[f"{name}.weight.lora_b"] = b.float().contiguous()
    return tensors


def write_gguf(adapter: Adapter, file: Path) -> None:
    """Write the adapter as llama.cpp's GGUF LoRA file (fp32 tensors)."""
    gguf = require_gguf()
    arch = ARCHITECTURES[adapter.base.model_type][0]
    alpha, _ = adapter.folding(per_rank=True)
    writer = gguf.GGUFWriter(str(file), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, tensor in gguf_tensors(adapter).items():
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _arch(gguf, name: str):
    return next(arch for arch, arch_name in gguf.MODEL_ARCH_NAMES.items() if arch_name == name)
