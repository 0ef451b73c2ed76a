"""llama.cpp's logits with the GGUF adapter `lorafit export --for llamacpp` writes, against transformers + peft.

Two tiny models with random weights: a Llama (grouped-query attention; q/k rows reordered for llama.cpp's
rotary) and a GPT-2 (q/v on the fused c_attn, tied head). Each gets a random lorafit adapter on every projection
(and on Llama the token embedding), with rsLoRA (on Llama also v_proj at twice the rank), so that the folding of scalings
into lora_b is exercised. Its base is written as a GGUF model here with `gguf` (f32, named and ordered as
convert_hf_to_gguf.py does, with a byte vocabulary whose text never matters: prompts are token ids), its
adapter by `lorafit export`. Three prompts go through llama.cpp (llama-cpp-python) with and without the adapter
and through transformers and peft; the report gives the largest |logit difference| of each pair, and how far
the adapter moves the logits at all.

    python bench/llamacpp_parity.py [--out DIR] [--converter llama.cpp/convert_lora_to_gguf.py]

llama-cpp-python has no wheel for every machine: `CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python`
builds llama.cpp from source (cmake, a C++ compiler). tests/adapter/test_llamacpp_parity.py runs this check
where llama_cpp is importable.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [[1, 72, 101, 108, 108, 111], [1, 300, 7, 19, 250, 3, 88, 141, 200], [1, *range(40, 53)]]
VOCAB = 320
CONFIGS = {  # random tiny models; Llama with grouped-query attention, GPT-2 with its fused c_attn and tied head
    "llama": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 128, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
              "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "vocab_size": VOCAB, "bos_token_id": 1,
             "eos_token_id": 2},
}
# GPT-2's head is its embedding table, one tensor in llama.cpp: no embedding LoRA there (export refuses it)
TARGETS = {"llama": ["q", "k", "v", "o", "gate", "up", "down", "embed"], "gpt2": ["q", "v", "o", "up", "down"]}
CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")  # GPT-2 stores these [d_in, d_out]
# largest |logit difference| allowed, fp32 on both sides (logits span about ±20): summation order for Llama; GPT-2's
# GELU, which ggml takes from an fp16 table, moves the base model's logits by about 2e-3 by itself
TOLERANCE = {"llama": 1e-4, "gpt2": 5e-3}


def tiny_model(arch: str, folder: Path):
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(arch, **CONFIGS[arch])
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # larger than the default init, so logits spread out
            parameter.copy_(torch.randn_like(parameter) * (0.2 if parameter.ndim > 1 else 0.1) + (parameter.ndim == 1))
    model.save_pretrained(folder)
    return model


def random_adapter(model, folder: Path, plain: bool = False) -> None:
    """lorafit's own adapter on every target: rsLoRA (on Llama with v_proj at twice the rest's rank), or `plain`."""
    from lorafit.adapter.save import save_adapter
    from lorafit.model.inject import inject_lora, lora_layer, replace_module

    targets = TARGETS[model.config.model_type]
    layers = inject_lora(model, targets, 4, 8, use_rslora=not plain)
    for path, layer in layers.items():
        if path.endswith("v_proj") and not plain:
            replace_module(model, path, lora_layer(layer.base, 8, 8, use_rslora=True))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    save_adapter(model, folder, base_model="tiny", targets=targets)


def gguf_base(model, file: Path) -> None:
    """The base as llama.cpp's f32 GGUF model, tensor by tensor as convert_hf_to_gguf.py names and orders them."""
    import gguf

    from lorafit.adapter.gguf import ARCHITECTURES, rotary_rows

    config = model.config
    arch = ARCHITECTURES[config.model_type][0]
    writer = gguf.GGUFWriter(str(file), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    if arch == "llama":
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
        writer.add_rope_freq_base(10000.0)  # transformers' default rope_theta
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    else:
        writer.add_feed_forward_length(4 * config.hidden_size)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    # SentencePiece-style vocabulary: <unk>, <s>, </s>, the 256 byte tokens llama.cpp looks up, then fillers
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    tokens += [f"t{i}" for i in range(config.vocab_size - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, *[gguf.TokenType.BYTE] * 256]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types + [gguf.TokenType.NORMAL] * (len(tokens) - len(types)))
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": getattr(config, "num_key_value_heads", None)}
    for name, tensor in model.state_dict().items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue  # buffers (rotary frequencies, GPT-2's causal mask), and a tied head llama.cpp shares itself
        tensor = tensor.float()
        module = name.rsplit(".", 2)[-2]
        if module in heads and arch == "llama":
            tensor = rotary_rows(tensor, heads[module])
        if name.endswith(CONV1D):
            tensor = tensor.t()
        writer.add_tensor(gguf_name, tensor.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_logits(base: Path, adapter: Path | None) -> list[torch.Tensor]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(base), lora_path=None if adapter is None else str(adapter), n_ctx=64, n_batch=64,
                logits_all=True, n_threads=1, verbose=False, type_k=0, type_v=0)  # 0: an f32 KV cache (f16 by default)
    out = []
    for prompt in PROMPTS:
        llm.reset()
        llm.eval(prompt)
        out.append(torch.tensor(llm.scores[:len(prompt)]).float())
    return out


@torch.no_grad()
def torch_logits(model) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([prompt])).logits[0].float() for prompt in PROMPTS]


def largest(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def gguf_arrays(file: Path) -> dict:
    import gguf

    return {tensor.name: torch.from_numpy(tensor.data.copy()) for tensor in gguf.GGUFReader(str(file)).tensors}


def converter_diff(converter: Path, out: Path) -> float:
    """Largest |difference| between llama.cpp's own convert_lora_to_gguf.py and lorafit export, tensor by tensor,
    on a plain adapter of every target (one rank, no rsLoRA: what the converter reads right)."""
    import transformers

    from lorafit.adapter.export import export_adapter

    random_adapter(transformers.AutoModelForCausalLM.from_pretrained(out / "base"), out / "plain", plain=True)
    export_adapter(out / "plain", "llamacpp", out / "plain-gguf", base=str(out / "base"))
    subprocess.run([sys.executable, str(converter), str(out / "plain"), "--base", str(out / "base"), "--outfile",
                    str(out / "plain-converted.gguf"), "--outtype", "f32"], check=True, capture_output=True)
    ours, theirs = gguf_arrays(out / "plain-gguf" / "adapter.gguf"), gguf_arrays(out / "plain-converted.gguf")
    if set(ours) != set(theirs):
        raise SystemExit(f"tensor names differ: {sorted(set(ours) ^ set(theirs))}")
    return max((ours[name] - theirs[name]).abs().max().item() for name in ours)


def run(out: Path, arch: str = "llama", converter: Path | None = None) -> dict:
    """Build, export and compare in `out`; the figures as a dict."""
    import peft
    import transformers

    from lorafit.adapter.export import export_adapter

    base = tiny_model(arch, out / "base")
    random_adapter(transformers.AutoModelForCausalLM.from_pretrained(out / "base"), out / "adapter")
    export = export_adapter(out / "adapter", "llamacpp", out / "gguf", base=str(out / "base"))
    gguf_base(base, out / "base.gguf")
    adapted = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(out / "base"),
                                             out / "adapter").eval()
    reference_base, reference = torch_logits(base), torch_logits(adapted)
    engine_base = llama_cpp_logits(out / "base.gguf", None)
    engine = llama_cpp_logits(out / "base.gguf", out / "gguf" / "adapter.gguf")
    figures = {
        "arch": arch, "prompts": len(PROMPTS), "tokens": sum(map(len, PROMPTS)),
        "adapter_effect": largest(reference, reference_base),  # how far the adapter moves transformers' logits
        "base_max_abs_diff": largest(engine_base, reference_base),
        "adapter_max_abs_diff": largest(engine, reference),
        "greedy_tokens_equal": all(torch.equal(x.argmax(-1), y.argmax(-1)) for x, y in zip(engine, reference)),
        "export_problems": [p["rule"] for p in export["problems"]],
    }
    figures["pass"] = max(figures["base_max_abs_diff"], figures["adapter_max_abs_diff"]) < TOLERANCE[arch]
    if converter is not None:
        figures["converter_max_abs_diff"] = converter_diff(converter, out)
        figures["pass"] = figures["pass"] and figures["converter_max_abs_diff"] == 0
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="Folder for the models and files (default: a temporary one).")
    parser.add_argument("--converter", type=Path, help="llama.cpp's convert_lora_to_gguf.py: also compare its GGUF "
                        "with lorafit's, tensor by tensor, on a plain Llama adapter (it transposes GPT-2's).")
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print('llama_cpp is not importable: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python',
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="lorafit-llamacpp-"))
    results = [run(out / arch, arch, args.converter if arch == "llama" else None) for arch in CONFIGS]
    for figures in results:
        print(json.dumps(figures))
    return 0 if all(figures["pass"] for figures in results) else 1


if __name__ == "__main__":
    sys.exit(main())
