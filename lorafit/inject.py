"""Walk a model, wrap the targeted projections in LoRA layers, freeze everything else, count parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lorafit.errors import LorafitError
from lorafit.lora import LoRALinear
from lorafit.targets import architecture, fused_slices, matches_suffix


@dataclass
class Site:
    """One module to wrap, and which of its output features each requested target owns."""

    path: str
    module: nn.Module
    targets: list[str] = field(default_factory=list)
    slices: list[list[int]] | None = None  # None: the whole module


@dataclass(frozen=True)
class ParameterCount:
    total: int
    trainable: int

    @property
    def ratio(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def is_projection(module: nn.Module) -> bool:
    """nn.Linear, or a Linear-like module with a 2-D weight such as transformers' Conv1D."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def stores_transposed(module: nn.Module) -> bool:
    """GPT-2's Conv1D keeps its weight as [d_in, d_out]."""
    return not isinstance(module, nn.Linear)


def _matching(model: nn.Module, suffix: str) -> list[tuple[str, nn.Module]]:
    return [
        (path, module)
        for path, module in model.named_modules()
        if matches_suffix(path, suffix) and is_projection(module)
    ]


def find_sites(model: nn.Module, targets: list[str]) -> list[Site]:
    """Resolve semantic targets (via the architecture table) and literal module names to modules."""
    if not targets:
        raise LorafitError("no LoRA targets given; set [lora] targets, e.g. [\"q\", \"v\"]")
    config = model.config
    table = architecture(config.model_type)
    sites: dict[str, Site] = {}
    for name in dict.fromkeys(targets):
        target = table.get(name)
        matches = _matching(model, target.module if target else name)
        if not matches:
            known = ", ".join(table) or "(none: give module names)"
            raise LorafitError(
                f"target {name!r} does not exist in this {config.model_type} model; "
                f"use one of {known}, or a module name such as {_example_module(model)!r}"
            )
        for path, module in matches:
            site = sites.setdefault(path, Site(path, module))
            site.targets.append(name)
            slices = fused_slices(config, site.targets)
            if slices is None and len(site.targets) > 1:
                raise LorafitError(f"targets {site.targets} overlap on {path}; list that module only once")
            site.slices = None if slices is None else list(slices.values())
    return list(sites.values())


def _example_module(model: nn.Module) -> str:
    for path, module in model.named_modules():
        if is_projection(module):
            return path.rsplit(".", 1)[-1]
    return "q_proj"


def inject_lora(
    model: nn.Module,
    targets: list[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    *,
    init: str = "kaiming",
    use_rslora: bool = False,
) -> dict[str, LoRALinear]:
    """Replace each targeted projection by a LoRALinear around it and freeze all base parameters."""
    layers = {
        site.path: LoRALinear(
            site.module,
            rank,
            alpha,
            dropout,
            slices=site.slices,
            fan_in_fan_out=stores_transposed(site.module),
            init=init,
            use_rslora=use_rslora,
        )
        for site in find_sites(model, targets)
    }
    return freeze_and_wrap(model, layers)


def freeze_and_wrap(model: nn.Module, layers: dict[str, LoRALinear]) -> dict[str, LoRALinear]:
    """Freeze every base parameter, then put each LoRA layer where its module was: only LoRA trains."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for path, layer in layers.items():
        replace_module(model, path, layer)
    return layers


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` where `path` (dotted, as named_modules() gives it) is now."""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {path: module for path, module in model.named_modules() if isinstance(module, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put the plain projections back in place."""
    for path, layer in lora_layers(model).items():
        layer.merge()
        replace_module(model, path, layer.base)


def count_parameters(model: nn.Module) -> ParameterCount:
    """Totals over distinct tensors: `parameters()` yields a tied weight (GPT-2's wte/lm_head) once."""
    params = list(model.parameters())
    return ParameterCount(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
    )

