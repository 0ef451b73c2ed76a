"""The registry: one entry per LoRA variant and per start, with all that lorafit knows of it outside its layer.

An entry names the variant's layer class, the recipe keys its layers read, how a PEFT adapter file marks it
(config flags, the tensors it adds beside A and B), what it refuses, and the bytes its adapter file holds.
The rest of lorafit asks the registry instead of testing for a variant. A new variant is a layer module, an
entry here, its recipe keys (lorafit/recipe/schema.py) and its PEFT conversion (lorafit/adapter/convert.py).

Every layer has the same small protocol, `LoRALayer`; the rest of a layer is its own math.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.lora.adalora import AdaLoRALinear, RankAllocator, rank_allocator
from lorafit.lora.dora import DoRALinear
from lorafit.lora.embedding import LoRAEmbedding
from lorafit.lora.experts import ExpertLoRA
from lorafit.lora.linear import LoRALinear

FP32 = 4  # bytes of one saved value: adapters are saved in fp32


class LoRALayer(Protocol):
    """What every LoRA layer has: the frozen module it wraps and a trained low-rank update of it."""

    base: nn.Module
    rank: int
    alpha: float
    scaling: float
    use_rslora: bool
    dropout: nn.Module
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    merged: bool

    @property
    def weight_shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the update ΔW."""

    @property
    def max_rank(self) -> int:
        """The largest rank at which the update is still low-rank."""

    @property
    def lora_params(self) -> int:
        """Trained values."""

    def delta_weight(self) -> torch.Tensor:
        """ΔW as a dense `weight_shape` matrix, for merging (a parameter's layer: one per expert, stacked as the
        parameter is)."""

    def merge(self) -> None: ...

    def unmerge(self) -> None: ...


@dataclass(frozen=True)
class Init:
    """A way to start A and B ([lora] init)."""

    name: str
    variants: tuple[str, ...]  # the variants it is defined for
    residual: bool = False  # moves W0's principal part into the adapter: the base keeps the residual

    @property
    def pairs(self) -> int:
        """Rank-r pairs per slice in the saved adapter: a residual start is saved against the original base (2)."""
        return 2 if self.residual else 1


@dataclass(frozen=True, eq=False)
class Variant:
    """One [lora] variant (or the embedding tables' own layer): everything lorafit knows of it outside its layer."""

    name: str
    title: str  # in tables and messages
    layer: type[nn.Module]
    adapter_bytes: Callable[[LoRALayer], int]  # what the adapter file holds for one of its layers, for the report
    make: Callable[..., LoRALayer] | None = None  # builds a layer (default: `layer` itself); see `build`
    rank_key: str = "rank"  # the recipe key its layers' rank comes from, in [lora] or in its sub-table
    keys: str | None = None  # its sub-table of [lora] ([lora.adalora]) for keys no other variant reads
    embeddings: bool = False  # adapts embedding tables too (with EMBEDDING's layer)
    parameters: bool = False  # adapts expert weights and other parameters too (with PARAMETER's layer)
    peft_flags: dict[str, object] = field(default_factory=dict)  # adapter_config.json entries that mark it
    peft_tensors: dict[str, str] = field(default_factory=dict)  # its tensors beside A and B: part -> peft's name;
    # each holds one value per output row of the module
    saved_as: str | None = None  # the variant its adapter loads as, when not itself
    refuse: Callable[[object, object], str | None] | None = None  # ([lora], [train]) -> why not, or None
    resume_refusal: str = ""  # why --resume is refused ("" allows it)
    allocator: Callable[..., RankAllocator] | None = None  # (layers, [lora], total steps): ranks moved between steps
    exports: str = ""  # what its adapter file holds, where that is not what it trains

    def build(self, module: nn.Module, rank: int, alpha: float, dropout: float = 0.0, **options) -> LoRALayer:
        """Its layer around `module`; options: slices, fan_in_fan_out, init, use_rslora."""
        return (self.make or self.layer)(module, rank, alpha, dropout, **options)

    def rank(self, lora) -> int:
        """The rank its layers start at, from a recipe's [lora] section."""
        return getattr(getattr(lora, self.keys) if self.keys else lora, self.rank_key)

    @property
    def rank_name(self) -> str:
        """The recipe key `rank` reads, as messages name it."""
        return f"[lora.{self.keys}] {self.rank_key}" if self.keys else f"[lora] {self.rank_key}"


def _pairs_bytes(layer: LoRALayer, stacked_rank: int) -> int:
    """A [R, d_in] and B [d_out, R] in fp32: B is saved full-width, also for a fused projection's slices."""
    return stacked_rank * sum(layer.weight_shape) * FP32


def _lora_bytes(layer: LoRALinear) -> int:
    return _pairs_bytes(layer, INITS[layer.init].pairs * layer.lora_A.shape[0])


def _dora_bytes(layer: DoRALinear) -> int:
    d_out, _ = layer.weight_shape
    return _lora_bytes(layer) + d_out * FP32  # the magnitude, saved over every output row


def _adalora_bytes(layer: AdaLoRALinear) -> int:
    """The kept triplets (one zero pair where none is kept); all of them on the meta device, where none is pruned yet."""
    kept = layer.lora_A.shape[0] if layer.lora_E.is_meta else max(int(layer.kept().sum()), 1)
    return _pairs_bytes(layer, kept)


def _adalora_refusal(lora, train) -> str | None:
    keys = lora.adalora
    if train.mixed_precision == "fp16":
        return "[lora] variant = 'adalora' with fp16 loss scaling is not supported; use bf16 or 'no'"
    if keys.target_rank > keys.init_rank:
        return (f"[lora.adalora] target_rank = {keys.target_rank} is above init_rank = {keys.init_rank}; "
                "AdaLoRA only prunes ranks, so set target_rank <= init_rank")
    return None


def _embedding_layer(module: nn.Module, rank: int, alpha: float, dropout: float = 0.0, *, use_rslora: bool = False,
                     **_projection_options) -> LoRAEmbedding:
    """No dropout on token ids (as peft); slices, fan_in_fan_out and the SVD starts are a projection's."""
    return LoRAEmbedding(module, rank, alpha, use_rslora=use_rslora)


def _parameter_layer(module: nn.Module, rank: int, alpha: float, dropout: float = 0.0, *, parameter: str,
                     transposed: bool = False, init: str = "kaiming", use_rslora: bool = False, **_projection_options
                     ) -> ExpertLoRA:
    """No dropout: the update is to the weight, which x cannot be factored out of (peft refuses it too). The SVD
    starts are a projection's; a stack of experts starts kaiming or gaussian."""
    if INITS[init].residual:
        raise LorafitError(f"[lora] init = {init!r} starts from a linear layer's SVD and does not apply to expert "
                           "parameters; use init = 'kaiming', or leave the experts out of the targets")
    return ExpertLoRA(module, rank, alpha, parameter=parameter, transposed=transposed, init=init, use_rslora=use_rslora)


LORA = Variant("lora", "LoRA", LoRALinear, _lora_bytes, embeddings=True, parameters=True)
DORA = Variant("dora", "DoRA", DoRALinear, _dora_bytes, peft_flags={"use_dora": True},
               peft_tensors={"magnitude": "lora_magnitude_vector"})
ADALORA = Variant(
    "adalora", "AdaLoRA", AdaLoRALinear, _adalora_bytes, rank_key="init_rank", keys="adalora", saved_as="lora",
    refuse=_adalora_refusal, resume_refusal="AdaLoRA runs cannot be resumed yet (their importance scores are not saved)",
    allocator=rank_allocator,
    exports="AdaLoRA trains init_rank triplets (P, Λ, Q) per slice and saves a plain LoRA of the triplets it keeps "
            "(target_rank on average), so its adapter file is smaller than shown",
)
# An embedding table's layer, under a variant that adapts tables; not a [lora] variant of its own.
EMBEDDING = Variant("embedding", "LoRA", LoRAEmbedding, lambda layer: _pairs_bytes(layer, layer.rank),
                    make=_embedding_layer)

# A weight parameter's layer (a stack of experts, a router), under a variant that adapts parameters: peft's
# `target_parameters`. Its adapter file holds A and B for every expert.
PARAMETER = Variant("parameter", "LoRA", ExpertLoRA, lambda layer: layer.lora_params * FP32, make=_parameter_layer)

VARIANTS = {variant.name: variant for variant in (LORA, DORA, ADALORA)}

INITS = {init.name: init for init in (
    Init("kaiming", tuple(VARIANTS)),
    Init("gaussian", tuple(VARIANTS)),
    Init("pissa", ("lora",), residual=True),
    Init("olora", ("lora",), residual=True),
)}

_BY_LAYER = {variant.layer: variant for variant in (*VARIANTS.values(), EMBEDDING, PARAMETER)}


def layer_variant(module: nn.Module) -> Variant | None:
    """The entry whose layer `module` is (its own class or one it derives from, as FSDP's wrappers do), or None."""
    return next((_BY_LAYER[kind] for kind in type(module).__mro__ if kind in _BY_LAYER), None)


def model_variant(layers: dict[str, LoRALayer]) -> Variant:
    """The variant of a model's projection layers (plain LoRA when it adapts embedding tables only)."""
    found = (layer_variant(layer) for layer in layers.values())
    return next((variant for variant in found if variant not in (EMBEDDING, PARAMETER)), LORA)


def for_module(variant: Variant, kind: str = "linear") -> Variant:
    """The entry whose layer wraps a module of `kind` ("linear", "embedding" or "parameter") under `variant`: its
    own, or EMBEDDING's for a table it adapts, or PARAMETER's for a weight parameter (experts) it adapts."""
    if kind == "linear":
        return variant
    if not (variant.embeddings if kind == "embedding" else variant.parameters):
        what = "the embedding" if kind == "embedding" else "the expert parameters"
        raise LorafitError(f"variant {variant.name!r} adapts linear layers only; leave {what} out of the targets")
    return EMBEDDING if kind == "embedding" else PARAMETER


def from_peft_config(config: dict) -> Variant:
    """The variant an adapter_config.json describes: the one whose flags it sets, else plain LoRA."""
    marked = (v for v in VARIANTS.values() if v.peft_flags and all(config.get(k) == f for k, f in v.peft_flags.items()))
    return next(marked, LORA)


def refusal(lora, train) -> str | None:
    """Why a recipe's [lora] (with its [train]) names a combination lorafit does not define, or None."""
    variant, init = VARIANTS[lora.variant], INITS[lora.init]
    if variant.name not in init.variants:
        allowed = " or ".join(repr(name) for name in init.variants)
        return f"[lora] init = {init.name!r} is defined for variant = {allowed} only; use one or the other"
    return variant.refuse(lora, train) if variant.refuse else None


def allocator_for(lora, layers: dict[str, LoRALayer], total_steps: int) -> RankAllocator | None:
    """What moves ranks between the steps of a run of the recipe's variant (AdaLoRA's allocator), or None."""
    variant = VARIANTS[lora.variant]
    return variant.allocator(layers, lora, total_steps) if variant.allocator else None
