"""Build data/tiny-moe, the offline mixture-of-experts demo model (run from the repository root, after build_tiny.py):

    python data/build_tiny_moe.py

A tiny Qwen3-MoE (2 layers, 8 experts of which 2 per token, as transformers 5 stores them: stacked 3-D
`mlp.experts.gate_up_proj` / `down_proj` behind the router `mlp.gate`) built from a config, with data/tiny-gpt2's
tokenizer, and pretrained briefly here on the text build_tiny.py generates, so that LoRA adapts a model that knows
the words. Deterministic (fixed seeds, two CPU threads); about 2 MB.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from build_tiny import DATA_DIR, EOS, MODEL_DIR, SEED, make_corpus  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402

from lorafit.storage import staged_dir  # noqa: E402

OUT = DATA_DIR / "tiny-moe"
DOCS, BLOCK, BATCH, STEPS, LR = 12000, 128, 16, 300, 3e-3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_model(vocab_size: int, eos_id: int) -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    return Qwen3MoeForCausalLM(config)


def blocks(tokenizer: Tokenizer, docs: list[str]) -> torch.Tensor:
    eos, flat = tokenizer.token_to_id(EOS), []
    for encoding in tokenizer.encode_batch(docs):
        flat += [*encoding.ids, eos]
    rows = len(flat) // BLOCK
    return torch.tensor(flat[: rows * BLOCK]).view(rows, BLOCK)


def pretrain(model: Qwen3MoeForCausalLM, data: torch.Tensor) -> None:
    """AdamW on every weight, warmup then cosine decay; data order from a seeded generator."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SEED)).repeat(
        math.ceil(STEPS * BATCH / len(data)))
    start = time.time()
    model.train()
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / 30) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / STEPS)))
        batch = data[order[step * BATCH:(step + 1) * BATCH]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == STEPS - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
    model.eval()


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    data = blocks(tokenizer, make_corpus(SEED + 7, DOCS))
    print(f"{data.numel():,} tokens of generated text", flush=True)
    model = build_model(tokenizer.get_vocab_size(), tokenizer.token_to_id(EOS))
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    pretrain(model, data)
    with staged_dir(OUT) as out:  # replaces data/tiny-moe only once it is whole
        model.save_pretrained(out)
        for name in TOKENIZER_FILES:
            shutil.copy(MODEL_DIR / name, Path(out) / name)
    for path in sorted(OUT.iterdir()):
        print(f"  {path.relative_to(DATA_DIR.parent)}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
