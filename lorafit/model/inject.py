"""Walk a model, wrap the targeted projections in LoRA layers, freeze everything else, count parameters."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lorafit.errors import LorafitError
from lorafit.lora.variants import VARIANTS, LoRALayer, for_module, layer_variant
from lorafit.model.targets import ALL_LINEAR, EMBED, Target, fused_slices, matches_suffix, semantic_targets


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


def is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


def model_targets(model: nn.Module) -> dict[str, Target]:
    """The model's semantic targets: its table row, or those its conventional module names give."""
    widths = {
        path.rsplit(".", 1)[-1]: module.out_features
        for path, module in model.named_modules()
        if isinstance(getattr(module, "out_features", None), int)
    }
    return semantic_targets(model.config, widths)


def linear_paths(model: nn.Module) -> list[str]:
    """Every linear projection except the output head: what peft's "all-linear" adapts."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [path for path, module in model.named_modules() if is_projection(module) and module is not head]


def _matching(model: nn.Module, suffix: str) -> list[tuple[str, nn.Module]]:
    named = [(path, module) for path, module in model.named_modules() if matches_suffix(path, suffix)]
    fitting = [(path, module) for path, module in named if is_projection(module) or is_embedding(module)]
    if named and not fitting:
        path, module = named[0]
        raise LorafitError(
            f"target {suffix!r} names {path}, a {type(module).__name__}, which is neither a linear layer nor an "
            "embedding; target the linear layers inside it"
        )
    return fitting


def _resolve(model: nn.Module, name: str, table: dict[str, Target]) -> list[tuple[str, nn.Module]]:
    """The modules one target names: all-linear, the input embedding, a semantic name or a module name."""
    if name == ALL_LINEAR:
        return [(path, model.get_submodule(path)) for path in linear_paths(model)]
    if name == EMBED:
        embedding = model.get_input_embeddings()
        return [(path, module) for path, module in model.named_modules() if module is embedding]
    target = table.get(name)
    return _matching(model, target.module if target else name)


def find_sites(model: nn.Module, targets: list[str]) -> list[Site]:
    """Resolve semantic targets (via the architecture table) and literal module names to modules."""
    if not targets:
        raise LorafitError("no LoRA targets given; set [lora] targets, e.g. [\"q\", \"v\"]")
    config = model.config
    table = model_targets(model)
    sites: dict[str, Site] = {}
    for name in dict.fromkeys(targets):
        matches = _resolve(model, name, table)
        if not matches:
            raise LorafitError(_no_match(model, name, table))
        for path, module in matches:
            site = sites.setdefault(path, Site(path, module))
            site.targets.append(name)
            slices = fused_slices(config, site.targets, table)
            if slices is None and len(site.targets) > 1:
                raise LorafitError(f"targets {site.targets} overlap on {path}; list that module only once")
            site.slices = None if slices is None else list(slices.values())
    return list(sites.values())


def _no_match(model: nn.Module, name: str, table: dict[str, Target]) -> str:
    """One line: what was asked, what this model offers, and its linear layers (a few names and the count)."""
    model_type = getattr(model.config, "model_type", "this")
    paths = linear_paths(model)
    names = sorted({path.rsplit(".", 1)[-1] for path in paths})
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    known = ", ".join([*table, ALL_LINEAR, EMBED])
    return (
        f"target {name!r} does not exist in this {model_type} model; use one of {known}, or a module name; "
        f"its linear layers are named {shown} ({len(paths)} in all)"
    )


def inject_lora(
    model: nn.Module,
    targets: list[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    *,
    init: str = "kaiming",
    use_rslora: bool = False,
    variant: str = "lora",
) -> dict[str, LoRALayer]:
    """Replace each targeted module by a LoRA layer of `variant` around it and freeze all base parameters."""
    sites = find_sites(model, targets)
    layers = {site.path: lora_layer(site.module, rank, alpha, dropout, variant=variant, slices=site.slices,
                                    init=init, use_rslora=use_rslora) for site in sites}
    return freeze_and_wrap(model, layers)


def wrap_targets(model: nn.Module, lora) -> dict[str, LoRALayer]:
    """A recipe's [lora]: its variant's layers, at the rank they start from, in place of its targets."""
    return inject_lora(model, lora.targets, VARIANTS[lora.variant].rank(lora), lora.alpha, lora.dropout,
                       init=lora.init, use_rslora=lora.use_rslora, variant=lora.variant)


def lora_layer(module: nn.Module, rank: int, alpha: float, dropout: float = 0.0, *, variant: str = "lora",
               **options) -> LoRALayer:
    """The layer that wraps `module` under `variant`: the variant's own, or the embedding tables' one."""
    entry = for_module(VARIANTS[variant], embedding=is_embedding(module))
    return entry.build(module, rank, alpha, dropout, fan_in_fan_out=stores_transposed(module), **options)


def freeze_and_wrap(model: nn.Module, layers: dict[str, LoRALayer]) -> dict[str, LoRALayer]:
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


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {path: module for path, module in model.named_modules() if layer_variant(module) is not None}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put the plain modules back in place.

    A weight shared with another module (GPT-2's wte and lm_head) gets its own copy first, and the config stops
    tying them: merging one end must not move the other, which the adapter never changed.
    """
    for path, layer in lora_layers(model).items():
        if _untie(model, layer.base):
            for config in (model.config, model.config.get_text_config()):
                config.tie_word_embeddings = False
        layer.merge()
        replace_module(model, path, layer.base)


def _untie(model: nn.Module, base: nn.Module) -> bool:
    """Give `base` its own weight when another module holds the same tensor; True if it did."""
    shared = any(
        parameter is base.weight and module is not base
        for module in model.modules()
        for parameter in module.parameters(recurse=False)
    )
    if shared:
        base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
    return shared


def count_parameters(model: nn.Module) -> ParameterCount:
    """Totals over distinct tensors: `parameters()` yields a tied weight (GPT-2's wte/lm_head) once."""
    params = list(model.parameters())
    return ParameterCount(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
    )
