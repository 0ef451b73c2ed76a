"""Fold an adapter into its base and save a plain Hugging Face model that loads without lorafit or peft.

Everything that can be refused is checked before anything is written; the merged model is written to a
hidden folder beside OUT and renamed into place, so OUT is either the old folder or the complete new one.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorafit.adapter.load import check_adapter, load_adapter, read_adapter_config
from lorafit.errors import LorafitError, os_failure
from lorafit.model.inject import merge_lora
from lorafit.model.load import context_length, knows_only_special_tokens, load_config, load_model
from lorafit.storage import staged_dir

PROBE_SEQUENCES = 4


PROBE_LENGTH = 16


MAX_SHARD_SIZE = "2GB"


HALF_DTYPES = (torch.bfloat16, torch.float16)


def merge_adapter(base: str, adapter: Path, out: Path, *, force: bool) -> dict:
    """Merge `adapter` into `base`, save it to `out`, and report how far merged logits drift from unmerged ones."""
    adapter, out = Path(adapter), Path(out)
    read_adapter_config(adapter)
    check_out(out, base, adapter, force=force)
    config = load_config(base)
    check_adapter(config, adapter)  # refuse a misfit before reading the base weights

    # Merge in fp32 and round once when casting back, rather than rounding ΔW to bf16 and then the sum.
    model = load_model(base, "float32").eval()
    load_adapter(model, adapter)
    probe = probe_inputs(model)
    before = logits(model, probe)
    merge_lora(model)
    check_finite_weights(model, base, adapter)
    after = logits(model, probe)
    dtype = saved_dtype(config)
    model.to(dtype)
    try:
        notes = write_merged(model, base, out)
    except OSError as error:  # staged beside OUT: nothing of the merge is left, and OUT is as it was
        raise os_failure(error, f"{out} is as it was") from error
    return {
        "base": base,
        "adapter": str(adapter),
        "out": str(out),
        "max_logit_diff": (before - after).abs().max().item(),
        "probe_tokens": probe.numel(),
        "dtype": str(dtype).removeprefix("torch."),
        "notes": notes,
    }


def check_out(out: Path, base: str | None, adapter: Path, *, force: bool) -> None:
    """An existing OUT is replaced only with --force, and never when it holds the base or the adapter."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise LorafitError(f"{out} exists; pass --force to replace it")
    from lorafit.train.run_folder import kind_of

    kind = kind_of(out) if out.is_dir() else None
    if kind is not None:
        raise LorafitError(f"{out} holds a lorafit {kind}, which --force does not replace; choose another folder "
                           "for the merged model")
    resolved = out.resolve()
    sources = [("adapter", adapter)] + ([("base model", Path(base).expanduser())] if base else [])
    for name, source in sources:
        if source.exists() and (source.resolve() == resolved or resolved in source.resolve().parents):
            raise LorafitError(f"{out} holds the {name} {source}; choose another folder for the merged model")


def check_finite_weights(model: nn.Module, base: str, adapter: Path) -> None:
    """Refuse to write a merged model with NaN or inf in any weight (from the base or the sum)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LorafitError(
                f"merging {adapter} into {base} gives NaN or inf in {name}; nothing was written. Check that the base "
                "model's weights are finite and that the adapter fits it"
            )


def probe_inputs(model: nn.Module) -> torch.Tensor:
    """A few seeded token sequences, valid for this model's vocabulary and context length."""
    vocab = model.get_input_embeddings().num_embeddings
    context = context_length(model.config)
    length = min(PROBE_LENGTH, context or PROBE_LENGTH)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (PROBE_SEQUENCES, length), generator=generator)
    return ids.to(model.get_input_embeddings().weight.device)


@torch.no_grad()
def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()


def saved_dtype(config) -> torch.dtype:
    """The dtype the base was saved in (bf16/fp16 stay so); fp32 for anything else."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in HALF_DTYPES else torch.float32


def write_merged(model: nn.Module, base: str, out: Path) -> list[str]:
    """save_pretrained (safetensors, sharded) plus the base's tokenizer, staged beside OUT and swapped in."""
    with staged_dir(out) as staging:
        model.save_pretrained(staging, max_shard_size=MAX_SHARD_SIZE)
        return copy_tokenizer(base, staging)


def copy_tokenizer(base: str, folder: Path) -> list[str]:
    """Save the base's tokenizer unchanged beside the merged weights; a base without one is noted, not refused."""
    from transformers import AutoTokenizer

    missing = [f"{base} has no tokenizer, so none was saved; copy one into the merged folder to use it"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, TypeError, KeyError):
        return missing
    if knows_only_special_tokens(tokenizer):
        return missing
    tokenizer.save_pretrained(folder)
    return []
