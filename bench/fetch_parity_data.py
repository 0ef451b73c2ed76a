"""Prepare job r's real model and real data in bench/.data/ (git-ignored): `python bench/fetch_parity_data.py`.

Model: Karpathy's stories260K (llama2.c, MIT; a Llama of 260k parameters trained on TinyStories) and its 512-token
SentencePiece tokenizer, converted to a transformers Llama folder (model.safetensors, tokenizer.json).
Data: GLUE's SST-2 sentences (Socher et al. 2013; 67,349 training phrases, the 872 labelled validation sentences);
its terms are the Stanford Sentiment Treebank's, so it is prepared here and never committed.

Files come from `--from DIR` (a folder holding the file names below) or are downloaded from the pinned addresses,
and are checked by sha-256 before use. The upstream weights are pinned to Hugging Face's karpathy/tinyllamas at
revision 0bd21da7; a public GitHub copy (plctlab/rvspoc-s2311-llama2 at 2fa3f650) holds the same floats with
its matrices re-laid by that repository's in-place transpose tool: five more passes of that transpose give back
the upstream file byte for byte, and the sha-256 check says whether they did.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import struct
import sys
import urllib.request
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / ".data"
TINYLLAMAS = "https://huggingface.co/karpathy/tinyllamas/resolve/0bd21da7698eaf29a0d7de3992de8a46ef624add/stories260K"
RAW = "https://raw.githubusercontent.com"
ALPS = f"{RAW}/forest-snow/alps/3c7ef2c98249fc975a897b27f275695f97d5b7a9/data/SST-2"
# name: (sha-256, addresses tried in turn)
FILES = {
    "stories260K.bin": ("b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696", [
        f"{TINYLLAMAS}/stories260K.bin",
        f"{RAW}/plctlab/rvspoc-s2311-llama2/2fa3f650cf1dc5a21e11c00a9c688be86947b061/stories260K.bin",
    ]),
    "tok512.bin": ("037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312", [
        f"{TINYLLAMAS}/tok512.bin",
        f"{RAW}/pure-water/llama2.c/cba85b7c06886a94a7023c80456ba6f0863dac8a/data/tok512.bin",
    ]),
    # alps splits GLUE's SST-2 training set into train.tsv and dev.tsv; its test.tsv is GLUE's validation set
    "train.tsv": ("920e317b2c52e12cd22db1da2c6708312bd7dc4f3712b9bbf1b50ee6c2c792ba", [f"{ALPS}/train.tsv"]),
    "dev.tsv": ("92353770071a2a889f75d000a38a9e541ea8f0a5499e50f040b17917a5cbf66f", [f"{ALPS}/dev.tsv"]),
    "test.tsv": ("54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0", [f"{ALPS}/test.tsv"]),
}
# llama2.c's run.c, greedy from this prompt (its stories260K documentation shows the same story)
GOLDEN_PROMPT = "Once upon a time"
GOLDEN = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def obtain(name: str, source: Path | None) -> bytes:
    """The file's bytes, from `source` or the first address that answers, checked against its sha-256."""
    digest, urls = FILES[name]
    candidates = [(str(source / name), lambda: (source / name).read_bytes())] if source else [
        (url, lambda url=url: urllib.request.urlopen(url, timeout=60).read()) for url in urls]
    for where, read in candidates:
        try:
            data = read()
        except OSError as error:
            print(f"  {where}: {error}", file=sys.stderr)
            continue
        if name == "stories260K.bin" and sha256(data) != digest:
            data = relaid_back(data)
        if sha256(data) == digest:
            print(f"  {name} from {where}")
            return data
        print(f"  {where}: sha-256 {sha256(data)} is not the pinned {digest}", file=sys.stderr)
    sys.exit(f"could not obtain {name}; put it in a folder and pass --from FOLDER")


def header(data: bytes) -> dict:
    dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack("7i", data[:28])
    return dict(dim=dim, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, vocab=vocab, seq=seq)


def matrices(h: dict) -> list[tuple[int, int, int]]:
    """(offset in floats, rows, columns) of every matrix of a llama2.c checkpoint, in file order."""
    dim, hidden, layers, vocab = h["dim"], h["hidden"], h["layers"], abs(h["vocab"])
    kv_dim = dim * h["kv_heads"] // h["heads"]
    found, offset = [(0, vocab, dim)], vocab * dim + layers * dim  # embedding; attention norms
    for rows, cols in ((dim, dim), (kv_dim, dim), (kv_dim, dim), (dim, dim)):  # wq, wk, wv, wo
        found += [(offset + i * rows * cols, rows, cols) for i in range(layers)]
        offset += layers * rows * cols
    offset += layers * dim  # feed-forward norms
    for rows, cols in ((hidden, dim), (dim, hidden), (hidden, dim)):  # w1, w2, w3
        found += [(offset + i * rows * cols, rows, cols) for i in range(layers)]
        offset += layers * rows * cols
    return found


def relaid_back(data: bytes, passes: int = 5) -> bytes:
    """The plctlab copy's matrices through that repository's transpose (each [rows, cols] laid out as its
    transpose) `passes` times; the caller checks the result's sha-256."""
    weights = np.frombuffer(data, dtype=np.float32, offset=28).copy()
    for _ in range(passes):
        for offset, rows, cols in matrices(header(data)):
            block = weights[offset : offset + rows * cols]
            weights[offset : offset + rows * cols] = block.reshape(rows, cols).T.reshape(-1)
    return data[:28] + weights.tobytes()


def llama_state(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, transformers Llama state dict) of a llama2.c checkpoint (format version 0)."""
    h = header(data)
    dim, hidden, layers, heads, kv_heads, seq = (h[k] for k in ("dim", "hidden", "layers", "heads", "kv_heads", "seq"))
    vocab, head = abs(h["vocab"]), dim // heads
    floats = torch.from_numpy(np.frombuffer(data, dtype=np.float32, offset=28).copy())
    at = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal at
        size = int(np.prod(shape))
        at += size
        return floats[at - size : at].reshape(shape)

    def rotary(w: torch.Tensor, n: int) -> torch.Tensor:
        # llama2.c rotates interleaved pairs (x0, x1), (x2, x3), ...; transformers rotates the two halves of a head
        rows, cols = w.shape
        return w.reshape(n, rows // n // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    kv_dim = kv_heads * head
    embed, attn_norm = take(vocab, dim), take(layers, dim)
    wq, wk = take(layers, dim, dim), take(layers, kv_dim, dim)
    wv, wo = take(layers, kv_dim, dim), take(layers, dim, dim)
    ffn_norm = take(layers, dim)
    w1, w2, w3 = take(layers, hidden, dim), take(layers, dim, hidden), take(layers, hidden, dim)
    final_norm = take(dim)
    take(seq, head // 2), take(seq, head // 2)  # llama2.c's precomputed rotary tables (theta 10000)
    state = {"model.embed_tokens.weight": embed, "model.norm.weight": final_norm}
    if h["vocab"] < 0:  # a negative vocabulary size marks an untied output head
        state["lm_head.weight"] = take(vocab, dim)
    for i in range(layers):
        block = f"model.layers.{i}."
        parts = {
            "input_layernorm": attn_norm[i], "post_attention_layernorm": ffn_norm[i],
            "self_attn.q_proj": rotary(wq[i], heads), "self_attn.k_proj": rotary(wk[i], kv_heads),
            "self_attn.v_proj": wv[i], "self_attn.o_proj": wo[i],
            "mlp.gate_proj": w1[i], "mlp.down_proj": w2[i], "mlp.up_proj": w3[i],
        }
        state.update({f"{block}{name}.weight": tensor for name, tensor in parts.items()})
    if at != floats.numel():
        sys.exit(f"stories260K.bin: read {at} of {floats.numel()} floats; not a llama2.c version-0 checkpoint")
    return h, state


def tokenizer_from(data: bytes):
    """A transformers Llama tokenizer from llama2.c's tokenizer.bin: its pieces in id order, merges by rank."""
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    pieces, at = [], 4  # a leading int: the longest piece's length
    while at < len(data):
        _, size = struct.unpack("fi", data[at : at + 8])
        pieces.append(data[at + 8 : at + 8 + size].decode("utf-8"))
        at += 8 + size
    pieces[1], pieces[2] = "<s>", "</s>"  # llama2.c writes them as "\n<s>\n" and "\n</s>\n"
    vocab = {piece.replace(" ", "\u2581"): index for index, piece in enumerate(pieces)}
    return LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), legacy=False, add_bos_token=True)


def convert_model(source: Path | None, out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    h, state = llama_state(obtain("stories260K.bin", source))
    tokenizer = tokenizer_from(obtain("tok512.bin", source))
    config = LlamaConfig(
        vocab_size=abs(h["vocab"]), hidden_size=h["dim"], intermediate_size=h["hidden"], num_hidden_layers=h["layers"],
        num_attention_heads=h["heads"], num_key_value_heads=h["kv_heads"], max_position_embeddings=h["seq"],
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=h["vocab"] > 0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False)  # lm_head is the tied embedding
    model.eval()
    prompt = tokenizer(GOLDEN_PROMPT, return_tensors="pt").input_ids
    story = tokenizer.decode(model.generate(prompt, max_new_tokens=40, do_sample=False)[0], skip_special_tokens=True)
    if not story.startswith(GOLDEN):
        sys.exit(f"the converted model does not tell llama2.c's greedy story: {story!r}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"  greedy check: {story[:60]!r}...")


def convert_sst2(source: Path | None, out: Path) -> None:
    """GLUE's SST-2 as jsonl: train = alps train.tsv + dev.tsv (67,349 rows), validation = test.tsv (872)."""
    out.mkdir(parents=True, exist_ok=True)
    for split, names in (("train", ("train.tsv", "dev.tsv")), ("validation", ("test.tsv",))):
        rows = []
        for name in names:
            lines = obtain(name, source).decode("utf-8").splitlines()
            rows += [{"sentence": r["sentence"].strip(), "label": int(r["label"])} for r in csv.DictReader(
                lines, delimiter="\t", quoting=csv.QUOTE_NONE)]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"  {split}: {len(rows)} rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, help="a folder with " + ", ".join(FILES))
    parser.add_argument("--out", type=Path, default=DATA)
    args = parser.parse_args()
    convert_model(args.source, args.out / "stories260K")
    convert_sst2(args.source, args.out / "sst2")
    sources = {name: {"sha256": digest, "urls": urls} for name, (digest, urls) in FILES.items()}
    (args.out / "SOURCES.json").write_text(json.dumps(sources, indent=1) + "\n")
    print(f"ready: {args.out}")


if __name__ == "__main__":
    main()
