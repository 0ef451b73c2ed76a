"""vLLM with the adapter `lorafit export --for vllm` writes, against transformers + peft (needs a CUDA GPU and vllm).

A tiny Llama (random weights, head_dim 64 for vLLM's attention kernels, grouped-query attention) gets a random
lorafit adapter on every projection, with rsLoRA and v_proj at twice the rank, so that the one-alpha folding
matters. vLLM loads the exported folder as a LoRA request and scores three prompts in bf16; the reference is
peft in fp32. The figures: the largest |log-prob difference| over each prompt's last position's top tokens, and
how many tokens of greedy 8-token continuations agree. `make gpu-check` runs it when vllm is importable.

    python bench/vllm_parity.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [[1, 72, 101, 108, 108, 111], [1, 300, 7, 19, 250, 3, 88, 141, 200], [1, *range(40, 53)]]
SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256, "vocab_size": 512, "bos_token_id": 1,
         "eos_token_id": 2, "tie_word_embeddings": False}
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
NEW_TOKENS, TOP = 8, 5
TOLERANCE = 0.1  # log-probs: vLLM runs bf16, the reference fp32


def build(out: Path):
    import transformers

    from lorafit.adapter.save import save_adapter
    from lorafit.model.inject import inject_lora, lora_layer, replace_module

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).save_pretrained(out / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "base")
    layers = inject_lora(model, TARGETS, 8, 16, use_rslora=True)
    for path, layer in layers.items():
        if path.endswith("v_proj"):
            replace_module(model, path, lora_layer(layer.base, 16, 16, use_rslora=True))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    save_adapter(model, out / "adapter", base_model=str(out / "base"), targets=TARGETS)


@torch.no_grad()
def reference(out: Path) -> tuple[list[torch.Tensor], list[list[int]]]:
    """peft in fp32: each prompt's last-position log-probs, and its greedy continuation."""
    import peft
    import transformers

    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(out / "base"),
                                           out / "adapter").eval()
    logprobs, greedy = [], []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        logprobs.append(model(input_ids=ids).logits[0, -1].float().log_softmax(-1))
        generated = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                   do_sample=False, pad_token_id=0)
        greedy.append(generated[0, len(prompt):].tolist())
    return logprobs, greedy


def served(out: Path) -> tuple[list[dict[int, float]], list[list[int]]]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=str(out / "base"), dtype="bfloat16", enable_lora=True, max_lora_rank=16, max_loras=1,
              skip_tokenizer_init=True, enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=256)
    request = LoRARequest("adapter", 1, str(out / "vllm"))
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=TOP, ignore_eos=True, detokenize=False)
    results = llm.generate([{"prompt_token_ids": prompt} for prompt in PROMPTS], params, lora_request=request)
    firsts = [{token: entry.logprob for token, entry in result.outputs[0].logprobs[0].items()} for result in results]
    return firsts, [list(result.outputs[0].token_ids) for result in results]


def run(out: Path) -> dict:
    from lorafit.adapter.export import export_adapter

    build(out)
    export = export_adapter(out / "adapter", "vllm", out / "vllm", base=str(out / "base"))
    expected, expected_greedy = reference(out)
    firsts, greedy = served(out)
    diff = max(abs(logprob - expected[i][token].item()) for i, first in enumerate(firsts)
               for token, logprob in first.items())
    agree = [a == b for ours, theirs in zip(greedy, expected_greedy) for a, b in zip(ours, theirs)]
    figures = {"prompts": len(PROMPTS), "export_problems": [p["rule"] for p in export["problems"]],
               "logprob_max_abs_diff": diff, "greedy_tokens_agreeing": f"{sum(agree)}/{len(agree)}",
               "pass": diff < TOLERANCE}  # bf16 may flip a near-tie late in a continuation: reported, not judged
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="Folder for the model and adapters (default: a temporary one).")
    args = parser.parse_args()
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vllm is not importable here; nothing to check", file=sys.stderr)
        return 2
    figures = run(args.out or Path(tempfile.mkdtemp(prefix="lorafit-vllm-")))
    print(json.dumps(figures), flush=True)
    return 0 if figures["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
