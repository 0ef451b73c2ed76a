"""Weights that are parameters rather than linear layers: mixture-of-experts stacks, routers, custom layers.

transformers 5 keeps a MoE layer's experts as 3-D parameters of one module, indexed inside its own forward, behind
a router that holds a 2-D weight but is no nn.Linear. LoRA adapts such a parameter with its own layer
(lorafit.lora.experts), as peft's `target_parameters` does; this module finds them, and names the ones a target
such as "all-linear" passes over, so that nothing holding weights is skipped in silence.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn

from lorafit.model.targets import EXPERT_PARAMETERS, matches_suffix


@dataclass(frozen=True)
class Parameter:
    """One weight parameter to adapt: the module that holds it, its path and the parameter's name."""

    path: str  # of the module
    module: nn.Module
    name: str

    @property
    def full(self) -> str:
        """The parameter's own path, as named_parameters() and peft's target_parameters name it."""
        return f"{self.path}.{self.name}"


def stores_transposed(module: nn.Module) -> bool:
    """transformers marks experts stored [experts, d_in, d_out] (gpt-oss) with `is_transposed`; peft reads it too."""
    return bool(getattr(module, "is_transposed", False))


def weight_parameters(module: nn.Module) -> list[str]:
    """What LoRA on a parameter can adapt in a module that is no linear layer: its 3-D stacks (experts), or else a
    2-D `weight` (a router). Biases, norms and scalars are not weights to adapt."""
    own = dict(module.named_parameters(recurse=False))
    stacks = [name for name, parameter in own.items() if parameter.ndim == 3]
    if stacks:
        return stacks
    weight = own.get("weight")
    return ["weight"] if weight is not None and weight.ndim == 2 else []


def expert_parameters(model: nn.Module, names: tuple[str, ...] = tuple(EXPERT_PARAMETERS.values())) -> list[Parameter]:
    """The stacked expert weights called `names` in every MoE layer, in the model's order."""
    return [
        Parameter(path, module, name)
        for path, module in model.named_modules()
        for name, parameter in module.named_parameters(recurse=False)
        if parameter.ndim == 3 and name in names
    ]


def named_parameters(model: nn.Module, name: str, is_layer) -> list[Parameter]:
    """The weight parameters a target names: by a dotted suffix of the parameter's path ("experts.gate_up_proj",
    "mlp.gate.weight"), or all of a module's (`weight_parameters`) by a suffix of the module's ("mlp.experts").
    Modules for which `is_layer` (a linear layer or an embedding) holds are targeted as modules, never here."""
    found = []
    for path, module in model.named_modules():
        if is_layer(module):
            continue
        whole = matches_suffix(path, name)
        found += [Parameter(path, module, own) for own in weight_parameters(module)
                  if whole or matches_suffix(f"{path}.{own}", name)]
    return found


def passed_over(model: nn.Module, adapted: set[str], is_layer, head: nn.Module | None) -> list[str]:
    """The weight-holding modules that neither are adapted layers nor hold adapted parameters, as "name (Class)
    ×count" with the path's last two parts: what "all-linear" leaves out (routers, custom layers)."""
    left: Counter[tuple[str, str]] = Counter()
    for path, module in model.named_modules():
        if module is head or is_layer(module):
            continue
        names = [own for own in weight_parameters(module) if f"{path}.{own}" not in adapted]
        if names:
            left[(".".join(path.split(".")[-2:]), type(module).__name__)] += 1
    return [f"{name} ({kind}) ×{count}" for (name, kind), count in left.items()]
