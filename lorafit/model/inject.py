"""Walk a model, wrap the targeted projections (and weight parameters) in LoRA layers, freeze everything else,
count parameters."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lorafit.errors import LorafitError
from lorafit.lora.experts import ExpertLoRA
from lorafit.lora.variants import VARIANTS, LoRALayer, for_module, layer_variant
from lorafit.model import experts
from lorafit.model.targets import (
    ALL_LINEAR,
    EMBED,
    EXPERT_PARAMETERS,
    EXPERTS,
    SEMANTIC_TARGETS,
    Target,
    fused_slices,
    matches_suffix,
    semantic_targets,
)


@dataclass
class Site:
    """One module to wrap, and which of its output features each requested target owns; or, with `parameter`,
    one weight parameter of the module (a stack of experts) to adapt."""

    path: str
    module: nn.Module
    targets: list[str] = field(default_factory=list)
    slices: list[list[int]] | None = None  # None: the whole module
    parameter: str | None = None

    @property
    def key(self) -> str:
        """The layer's name in lorafit's layers and reports: the module's path, or the parameter's."""
        return self.path if self.parameter is None else f"{self.path}.{self.parameter}"


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


def is_layer(module: nn.Module) -> bool:
    """A module LoRA wraps whole: a linear layer or an embedding."""
    return is_projection(module) or is_embedding(module)


def _matching(model: nn.Module, suffix: str) -> list[tuple[str, nn.Module]]:
    return [(path, module) for path, module in model.named_modules() if matches_suffix(path, suffix) and is_layer(module)]


Found = tuple[list[tuple[str, nn.Module]], list[experts.Parameter]]


def _resolve(model: nn.Module, name: str, table: dict[str, Target]) -> Found:
    """The modules and weight parameters one target names: all-linear (the experts' stacks included), the input
    embedding, the experts, a semantic name (its modules, and its stacks in MoE layers), or a module or parameter
    name."""
    if name == ALL_LINEAR:
        return [(path, model.get_submodule(path)) for path in linear_paths(model)], experts.expert_parameters(model)
    if name == EMBED:
        embedding = model.get_input_embeddings()
        return [(path, module) for path, module in model.named_modules() if module is embedding], []
    if name == EXPERTS:
        return [], experts.expert_parameters(model)
    modules = _matching(model, table[name].module if name in table else name)
    if name in EXPERT_PARAMETERS:
        return modules, experts.expert_parameters(model, (EXPERT_PARAMETERS[name],))
    if modules or name in SEMANTIC_TARGETS:  # "gate" is never taken for a router called mlp.gate
        return modules, []
    parameters = experts.named_parameters(model, name, is_layer)
    named = next(((path, module) for path, module in model.named_modules() if matches_suffix(path, name)), None)
    if not parameters and named is not None:
        path, module = named
        raise LorafitError(
            f"target {name!r} names {path}, a {type(module).__name__}, which is neither a linear layer nor an "
            "embedding and holds no weight to adapt; target the linear layers inside it"
        )
    return [], parameters


def find_sites(model: nn.Module, targets: list[str]) -> list[Site]:
    """Resolve semantic targets (via the architecture table), literal module names and parameter names to the
    modules and weight parameters to adapt."""
    if not targets:
        raise LorafitError("no LoRA targets given; set [lora] targets, e.g. [\"q\", \"v\"]")
    config = model.config
    table = model_targets(model)
    sites: dict[str, Site] = {}
    for name in dict.fromkeys(targets):
        modules, parameters = _resolve(model, name, table)
        if not modules and not parameters:
            raise LorafitError(_no_match(model, name, table))
        for parameter in parameters:  # a whole weight: naming it twice ("experts", "down") adapts it once
            sites.setdefault(parameter.full, Site(parameter.path, parameter.module, [], parameter=parameter.name))
            sites[parameter.full].targets.append(name)
        for path, module in modules:
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
    stacks = {parameter.name: parameter for parameter in experts.expert_parameters(model)}
    offered = [semantic for semantic, parameter in EXPERT_PARAMETERS.items() if parameter in stacks]
    known = ", ".join(dict.fromkeys([*table, *([EXPERTS, *offered] if stacks else []), ALL_LINEAR, EMBED]))
    gate_up = stacks.get(EXPERT_PARAMETERS["gate_up"])
    fused = (f"; its experts' gate and up are one stacked parameter ({gate_up.full}): target gate_up"
             if name in ("gate", "up") and gate_up else "")
    where = f" ({table[name].module} in this model's row)" if name in table else ""
    return (
        f"target {name!r}{where} does not exist in this {model_type} model; use one of {known}, or a module or "
        f"parameter name; its linear layers are named {shown} ({len(paths)} in all){fused}"
    )


def target_notes(model: nn.Module, targets: list[str], dropout: float) -> list[str]:
    """What the targets do that a user might not expect, one line each: "all-linear" adapts the experts' stacks too
    and names every weight-holding module it passes over (routers, custom layers); expert LoRA has no dropout."""
    sites = find_sites(model, targets)
    stacks = [site for site in sites if site.parameter is not None]
    notes = []
    if ALL_LINEAR in targets:
        if any(ALL_LINEAR in site.targets for site in stacks):
            names = ", ".join(sorted({f"{site.path.rsplit('.', 1)[-1]}.{site.parameter}" for site in stacks}))
            notes.append(f"all-linear adapts the experts' stacked weights too ({len(stacks)} in all: {names}), as "
                         "peft's target_parameters; list the modules instead (e.g. q, k, v, o) to leave them out")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        left = experts.passed_over(model, {site.key for site in sites}, is_layer, head)
        if left:
            notes.append(f"all-linear leaves out weight-holding modules that are not linear layers: {', '.join(left)}; "
                         "they stay frozen unless named in targets (by module or parameter name, e.g. "
                         f"{left[0].split(' ')[0]})")
    if stacks and dropout > 0:
        notes.append(f"[lora] dropout = {dropout:g} is not applied to the {len(stacks)} expert parameters: their "
                     "update is to the weight itself, where dropout has no place (peft's target_parameters have none)")
    return notes


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
    layers: dict[str, LoRALayer] = {}
    wrapped: dict[str, nn.Module] = {}  # module path -> the outermost layer around it so far
    for site in sorted(find_sites(model, targets), key=lambda site: nesting_order(site.module, site.parameter)):
        options = {"init": init, "use_rslora": use_rslora}
        if site.parameter is None:
            options["slices"] = site.slices
        else:  # a second parameter of the same module wraps the layer around the first, as peft nests them
            options.update(parameter=site.parameter, transposed=experts.stores_transposed(site.module))
        module = wrapped.get(site.path, site.module)
        layers[site.key] = wrapped[site.path] = lora_layer(module, rank, alpha, dropout, variant=variant, **options)
    return freeze_and_wrap(model, layers)


def nesting_order(module: nn.Module, parameter: str | None) -> int:
    """A module's parameters are wrapped in the order the module registers them (the first innermost), as peft does,
    whatever order the targets name them in: the adapter file's keys depend on it."""
    return 0 if parameter is None else [name for name, _ in module.named_parameters(recurse=False)].index(parameter)


def wrap_targets(model: nn.Module, lora) -> dict[str, LoRALayer]:
    """A recipe's [lora]: its variant's layers, at the rank they start from, in place of its targets."""
    return inject_lora(model, lora.targets, VARIANTS[lora.variant].rank(lora), lora.alpha, lora.dropout,
                       init=lora.init, use_rslora=lora.use_rslora, variant=lora.variant)


def lora_layer(module: nn.Module, rank: int, alpha: float, dropout: float = 0.0, *, variant: str = "lora",
               **options) -> LoRALayer:
    """The layer that wraps `module` under `variant`: the variant's own, the embedding tables' one, or, given
    `parameter`, the one that adapts that weight parameter of `module` (or of the module inside that layer)."""
    kind = "parameter" if "parameter" in options else "embedding" if is_embedding(module) else "linear"
    entry = for_module(VARIANTS[variant], kind)
    return entry.build(module, rank, alpha, dropout, fan_in_fan_out=stores_transposed(module), **options)


def freeze_and_wrap(model: nn.Module, layers: dict[str, LoRALayer]) -> dict[str, LoRALayer]:
    """Freeze every base parameter, then put each LoRA layer where its module was: only LoRA trains. A parameter's
    layers (keyed by the parameter's path) are nested innermost first, so the last one for a module takes its place."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for path, layer in layers.items():
        replace_module(model, path.rpartition(".")[0] if isinstance(layer, ExpertLoRA) else path, layer)
    return layers


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` where `path` (dotted, as named_modules() gives it) is now."""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer by its module's path; a parameter's layer by the parameter's path (`mlp.experts.down_proj`),
    whichever other layers of the same module it is nested in."""
    layers, owners = {}, {}  # owners: path of a parameter layer -> path of the module holding the parameter
    for path, module in model.named_modules():
        if isinstance(module, ExpertLoRA):  # nested inside another: at <owner>.base(.base...)
            owners[path] = owners.get(path.removesuffix(".base"), path)
            layers[f"{owners[path]}.{module.parameter}"] = module
        elif layer_variant(module) is not None:
            layers[path] = module
    return layers


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put the plain modules back in place.

    A weight shared with another module (GPT-2's wte and lm_head) gets its own copy first, and the config stops
    tying them: merging one end must not move the other, which the adapter never changed.
    """
    for path, layer in lora_layers(model).items():
        if isinstance(layer, ExpertLoRA):  # into the parameter; the module holding it goes back in place
            layer.merge()
            replace_module(model, path.rpartition(".")[0], layer.owner)
            continue
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
