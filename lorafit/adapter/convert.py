"""lorafit's LoRA layers in PEFT's plain form and back: per module {part: tensor} as adapter_model.safetensors
holds them ("A" [R, d_in], "B" [d_out, R], and a variant's own parts), peft's rank and alpha, lorafit.json's facts.

The layers know nothing of this. A fused projection's slices are written as one LoRA of rank n·r on the whole
module (A stacked, B block-structured with zero rows outside the slices); a PiSSA/OLoRA start against the original
base (rank 2r per slice); DoRA's magnitude over every output row; AdaLoRA's kept triplets as a plain LoRA.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorafit.adapter.format import peft_alpha
from lorafit.lora.adalora import AdaLoRALinear
from lorafit.lora.dora import DoRALinear
from lorafit.lora.embedding import LoRAEmbedding
from lorafit.lora.inits import against_original
from lorafit.lora.linear import LoRALinear, is_block_structured, whole
from lorafit.lora.variants import ADALORA, DORA, EMBEDDING, INITS, LORA, LoRALayer, Variant, layer_variant


@dataclass(frozen=True)
class Form:
    """How the layers of one registry entry are written in peft's form, and read back."""

    tensors: Callable[[LoRALayer], dict[str, torch.Tensor]]  # fp32, whole (a collective under FSDP2)
    rank_and_alpha: Callable[[LoRALayer, bool], tuple[int, float]]  # peft's r and lora_alpha, given its use_rslora
    facts: Callable[[LoRALayer], dict]  # the module's entry in lorafit.json
    load: Callable[[LoRALayer, dict[str, torch.Tensor]], None] | None  # None: it loads as plain LoRA, never itself
    transposed: Callable[[LoRALayer], bool] = lambda layer: layer.fan_in_fan_out  # weight stored [d_in, d_out]
    kind: str = "linear"  # which of peft's tensor names it takes (lorafit.adapter.format.TENSOR_NAMES)


def _facts(layer: LoRALayer, pairs: int, slices: list[int] | None) -> dict:
    """rank and alpha of one slice holding `pairs` rank-r pairs (of the module when `slices` is None)."""
    alpha = peft_alpha(layer.alpha, layer.rank, pairs, use_rslora=layer.use_rslora, peft_rslora=layer.use_rslora)
    return {"rank": pairs * layer.rank, "alpha": alpha, "use_rslora": layer.use_rslora, "slices": slices,
            "targets": None}


def _stacked_rank_and_alpha(layer: LoRALayer, pairs: int, peft_rslora: bool) -> tuple[int, float]:
    """`pairs` rank-r pairs stacked into one LoRA of rank pairs·r, with the layer's scaling."""
    return pairs * layer.rank, peft_alpha(layer.alpha, layer.rank, pairs, use_rslora=layer.use_rslora,
                                          peft_rslora=peft_rslora)


# ---------------------------------------------------------------- plain LoRA on a projection, fused slices included


def _lora_rank_and_alpha(layer: LoRALinear, peft_rslora: bool) -> tuple[int, float]:
    return _stacked_rank_and_alpha(layer, INITS[layer.init].pairs * len(layer.slice_sizes), peft_rslora)


def _lora_facts(layer: LoRALinear) -> dict:
    return _facts(layer, INITS[layer.init].pairs, list(layer.slice_sizes) if layer.slices is not None else None)


@torch.no_grad()
def _lora_tensors(layer: LoRALinear) -> dict[str, torch.Tensor]:
    """The equivalent plain LoRA of rank n_slices·r on the whole projection; after a PiSSA/OLoRA start, that of
    ΔW against the original base (rank 2r per slice)."""
    a, b = whole(layer.lora_A), whole(layer.lora_B)
    if INITS[layer.init].residual:
        a, b = against_original(layer, a, b)
    return {"A": a, "B": layer.full_B(b)}


@torch.no_grad()
def _load_lora(layer: LoRALinear, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `_lora_tensors` (a kaiming/gaussian start); refuses a B with non-zero entries outside the slices'
    blocks. Everything is checked before anything is copied, so a refusal leaves the layer as it was."""
    a, b = tensors["A"], tensors["B"]
    if a.shape != layer.lora_A.shape:
        raise ValueError(f"lora_A has shape {tuple(a.shape)}, expected {tuple(layer.lora_A.shape)}")
    expected = (layer.weight_shape[0], layer.lora_A.shape[0])
    if b.shape != expected:
        raise ValueError(f"lora_B has shape {tuple(b.shape)}, expected {expected}")
    stacked, r = b, layer.rank
    if layer.slices is not None:
        if not is_block_structured(b, layer.slices, r):
            raise ValueError("lora_B has non-zero entries outside the adapted output features")
        rows = [torch.tensor(features, device=b.device) for features in layer.slices]
        stacked = torch.cat([b[index, i * r:(i + 1) * r] for i, index in enumerate(rows)])
    layer.lora_A.copy_(a)
    layer.lora_B.copy_(stacked)


LORA_FORM = Form(_lora_tensors, _lora_rank_and_alpha, _lora_facts, _load_lora)


# ---------------------------------------------------------------- DoRA: LoRA plus a magnitude over every output row


def _row_norms(layer: DoRALinear) -> torch.Tensor:
    """||W0_row|| [d_out]: the magnitude of the rows DoRA leaves alone, as peft's DoRA starts them."""
    return torch.linalg.vector_norm(layer.base_weight(), dim=1)


def _adapted(layer: DoRALinear, device: torch.device) -> torch.Tensor:
    return torch.tensor(layer.out_index, dtype=torch.long, device=device)


@torch.no_grad()
def _dora_tensors(layer: DoRALinear) -> dict[str, torch.Tensor]:
    """LoRA's, and peft's lora_magnitude_vector [d_out]: ours at the adapted rows, ||W0_row|| at the others."""
    magnitude = whole(layer.lora_magnitude).float()
    if layer.out_index is not None:
        magnitude = _row_norms(layer).index_copy(0, _adapted(layer, magnitude.device), magnitude)
    return {**_lora_tensors(layer), "magnitude": magnitude}


@torch.no_grad()
def _load_dora(layer: DoRALinear, tensors: dict[str, torch.Tensor]) -> None:
    """Refuses a magnitude that moves rows outside the slices (they would not stay W0); changes nothing then."""
    magnitude = tensors.get("magnitude")
    if magnitude is None:
        raise ValueError("a DoRA layer needs its lora_magnitude_vector")
    d_out, _ = layer.weight_shape
    if tuple(magnitude.shape) != (d_out,):
        raise ValueError(f"lora_magnitude_vector has shape {tuple(magnitude.shape)}, expected ({d_out},)")
    if layer.out_index is not None:
        adapted = _adapted(layer, magnitude.device)
        others = torch.ones(d_out, dtype=torch.bool, device=magnitude.device).index_fill(0, adapted, False)
        if not torch.allclose(magnitude[others], _row_norms(layer).to(magnitude.device)[others], rtol=1e-6, atol=0):
            raise ValueError("lora_magnitude_vector moves output rows outside the adapted features")
        magnitude = magnitude.index_select(0, adapted)
    _load_lora(layer, tensors)
    layer.lora_magnitude.copy_(magnitude)


DORA_FORM = Form(_dora_tensors, _lora_rank_and_alpha, _lora_facts, _load_dora)


# ---------------------------------------------------------------- AdaLoRA: the kept triplets, as one plain LoRA


@torch.no_grad()
def _adalora_tensors(layer: AdaLoRALinear) -> dict[str, torch.Tensor]:
    """A = (Λ·Q)[kept], B = P[:, kept] on the whole module; a module with every triplet pruned keeps one zero pair,
    so that every consumer still sees a valid rank."""
    keep = layer.kept()
    if not keep.any():
        keep = torch.zeros_like(keep).index_fill_(0, torch.tensor([0], device=keep.device), True)
        return {"A": torch.zeros_like(layer.lora_A[keep]), "B": torch.zeros_like(layer.full_B()[:, keep])}
    return {"A": layer.effective_A()[keep], "B": layer.full_B()[:, keep]}


def _adalora_rank_and_alpha(layer: AdaLoRALinear, peft_rslora: bool) -> tuple[int, float]:
    """Ranks differ by module: keep the scaling, alpha/r_init, whatever the module's rank."""
    rank = max(int(layer.kept().sum()), 1)
    return rank, layer.scaling * (math.sqrt(rank) if peft_rslora else rank)


def _adalora_facts(layer: AdaLoRALinear) -> dict:
    rank, alpha = _adalora_rank_and_alpha(layer, layer.use_rslora)
    return {"rank": rank, "alpha": alpha, "use_rslora": layer.use_rslora, "slices": None, "targets": None,
            "adalora_ranks": layer.slice_ranks()}


ADALORA_FORM = Form(_adalora_tensors, _adalora_rank_and_alpha, _adalora_facts, load=None)


# ---------------------------------------------------------------- an embedding table: peft's lora_embedding_A/B


@torch.no_grad()
def _embedding_tensors(layer: LoRAEmbedding) -> dict[str, torch.Tensor]:
    """A [r, vocab] and B [d, r], as they are."""
    return {"A": whole(layer.lora_A), "B": whole(layer.lora_B)}


@torch.no_grad()
def _load_embedding(layer: LoRAEmbedding, tensors: dict[str, torch.Tensor]) -> None:
    for part, expected in (("A", layer.lora_A), ("B", layer.lora_B)):
        if tensors[part].shape != expected.shape:
            raise ValueError(f"lora_embedding_{part} has shape {tuple(tensors[part].shape)}, "
                             f"expected {tuple(expected.shape)}")
    layer.lora_A.copy_(tensors["A"])
    layer.lora_B.copy_(tensors["B"])


EMBEDDING_FORM = Form(_embedding_tensors, lambda layer, peft_rslora: _stacked_rank_and_alpha(layer, 1, peft_rslora),
                      lambda layer: _facts(layer, 1, None), _load_embedding, transposed=lambda layer: False, kind="embedding")


FORMS: dict[Variant, Form] = {LORA: LORA_FORM, DORA: DORA_FORM, ADALORA: ADALORA_FORM, EMBEDDING: EMBEDDING_FORM}


def _form(layer: LoRALayer) -> Form:
    return FORMS[layer_variant(layer)]


# ---------------------------------------------------------------- what save and load call


def peft_tensors(layer: LoRALayer) -> dict[str, torch.Tensor]:
    """{part: tensor} of the layer in peft's plain form; a collective under FSDP2 (every process calls it)."""
    return _form(layer).tensors(layer)


def load_peft_tensors(layer: LoRALayer, tensors: dict[str, torch.Tensor]) -> None:
    """Set the layer from peft's plain form; ValueError, with the layer unchanged, when a part does not fit."""
    load = _form(layer).load
    if load is None:
        raise ValueError(f"a {type(layer).__name__} is saved as plain LoRA and loads as one")
    load(layer, tensors)


def peft_rank_and_alpha(layer: LoRALayer, peft_rslora: bool) -> tuple[int, float]:
    """peft's r and lora_alpha for the module, so that peft's scaling (alpha/r, or alpha/sqrt(r) under its
    `use_rslora`) equals the layer's."""
    return _form(layer).rank_and_alpha(layer, peft_rslora)


def peft_kind(layer: LoRALayer) -> str:
    """"linear" or "embedding": the kind of peft tensor names the layer's parts take."""
    return _form(layer).kind


def fan_in_fan_out(layer: LoRALayer) -> bool:
    """peft's fan_in_fan_out: the base weight is stored [d_in, d_out] (GPT-2's Conv1D)."""
    return _form(layer).transposed(layer)


def module_facts(layer: LoRALayer) -> dict:
    """lorafit.json's entry for the module: rank and alpha of one slice (of the module when `slices` is None), the
    slices' sizes where the file's B is their blocks, and "targets" (None; the saver names them)."""
    return _form(layer).facts(layer)
