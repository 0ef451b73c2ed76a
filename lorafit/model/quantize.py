"""QLoRA's frozen base (Dettmers et al. 2023, arXiv 2305.14314): decoder-block projections stored as 4-bit NF4.

The quantizer is torchao's NF4 tensor, which runs on CPUs and GPUs alike: 4-bit NormalFloat codes in blocks of
64 weights, each block's absmax scale itself quantized to int8 in blocks of up to 256 (double quantization).
A 4-bit projection dequantizes its weight to the input's dtype in forward and in backward and is never trained;
the LoRA A and B around it stay full precision. Merging never happens into 4 bits: `lorafit merge` loads the
full-precision base, so an adapter trained on NF4 is an ordinary adapter.
"""
from __future__ import annotations

import torch
from torch import nn

from lorafit.errors import LorafitError

BLOCK = 64  # weights per NF4 block (QLoRA's choice)


SCALER_BLOCK = 256  # block scales per int8 block of the double quantization


QUANTIZE = ("none", "nf4")


INSTALL = "pip install 'lorafit[qlora]' (or pip install torchao)"


def require_torchao() -> None:
    """LorafitError (exit 2) with the pip command when torchao is missing."""
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as error:
        raise LorafitError(f"[model] quantize = 'nf4' needs torchao, which is not installed; {INSTALL}") from error


def check_quantizable(model: nn.Module) -> None:
    """Refuse a model whose experts are stacked 3-D parameters (MoE in transformers 5): NF4 here stores linear layers,
    so most of such a model's weights would stay full precision, the opposite of what 4 bits were asked for."""
    from lorafit.model.experts import expert_parameters

    stacks = expert_parameters(model)
    if stacks:
        held = sum(getattr(stack.module, stack.name).numel() for stack in stacks)
        share = held / sum(parameter.numel() for parameter in model.parameters())
        raise LorafitError(
            f"[model] quantize = 'nf4' stores linear layers in 4 bits, and this {model.config.model_type} model keeps "
            f"{share:.0%} of its weights in stacked expert parameters ({stacks[0].full} ...) that it cannot store; "
            "set quantize = 'none'"
        )


def scaler_block(numel: int) -> int | None:
    """The double quantization's block: the largest divisor of the block count up to 256; None if not 64-divisible."""
    if numel % BLOCK:
        return None
    blocks = numel // BLOCK
    return next(size for size in range(min(SCALER_BLOCK, blocks), 0, -1) if blocks % size == 0)


def nf4_bytes(numel: int, itemsize: int) -> int:
    """Bytes torchao keeps for an NF4 weight of `numel` values whose dequantized dtype has `itemsize` bytes:
    half a byte per weight, one int8 scale per block, one factor per scale block, a mean and the 16-value table.
    """
    blocks = numel // BLOCK
    return numel // 2 + blocks + (blocks // scaler_block(numel) + 1 + 16) * itemsize


class NF4Linear(nn.Linear):
    """A frozen nn.Linear whose weight is a torchao NF4 tensor: y = x·dequant(W)ᵀ + b.

    nn.Linear's own forward serves: torchao routes F.linear on an NF4 weight to an autograd function that
    saves the 4-bit weight for backward, not a dequantized copy.
    """

    quantized = True  # tells LoRALinear not to merge into this weight

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """`weight` [d_out, d_in] in full precision; it is quantized here and not kept."""
        from torchao.quantization import to_nf4

        d_out, d_in = weight.shape
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a full-precision weight
        self.in_features, self.out_features = d_in, d_out
        nf4 = to_nf4(weight.detach().contiguous(), BLOCK, scaler_block(weight.numel()))
        self.weight = nn.Parameter(nf4, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        """The weight as the forward pass sees it, [d_out, d_in] in the original dtype."""
        return self.weight.get_original_weight()


def quantize_blocks(model: nn.Module, blocks: nn.Module, fan_in_fan_out, device: torch.device | None = None) -> int:
    """Swap every frozen projection inside `blocks` (LoRA layers' bases included) for an NF4Linear.

    `fan_in_fan_out(module)` says whether a module stores its weight [d_in, d_out] (GPT-2's Conv1D); such a
    weight is transposed before quantizing. Each weight is moved to `device` first and quantized there, one at
    a time: on a GPU that takes seconds where every rank's CPU thread would take many minutes, and only one
    full-precision projection is on the device at once. Returns how many projections stayed full precision
    because their size is not a multiple of the 64-weight block.
    """
    require_torchao()
    from lorafit.model.inject import is_projection, replace_module

    prefix = next(path for path, module in model.named_modules() if module is blocks)
    kept = 0
    for path, module in list(blocks.named_modules()):
        if not is_projection(module):
            continue
        if scaler_block(module.weight.numel()) is None:
            kept += 1
            continue
        weight = module.weight.to(device) if device is not None else module.weight
        bias = module.bias.to(device) if device is not None and module.bias is not None else module.bias
        replace_module(model, f"{prefix}.{path}", NF4Linear(weight.t() if fan_in_fan_out(module) else weight, bias))
    return kept


def frozen_weight_bytes(model: nn.Module, *, planned: nn.Module | None = None, itemsize: int | None = None) -> int:
    """Bytes of the frozen parameters as stored: 4-bit weights at their real size, the rest at their dtype's.

    For a model not yet quantized (on the meta device, say), `planned` names the blocks `quantize_blocks` will
    quantize and `itemsize` the dtype the weights will load in.
    """
    from lorafit.model.inject import is_projection

    will_quantize = set()
    if planned is not None:
        will_quantize = {
            id(m.weight) for m in planned.modules() if is_projection(m) and scaler_block(m.weight.numel()) is not None
        }
    total = 0
    for parameter in {id(p): p for p in model.parameters() if not p.requires_grad}.values():
        size = itemsize or parameter.dtype.itemsize
        n = parameter.numel()
        total += nf4_bytes(n, size) if is_nf4(parameter) or id(parameter) in will_quantize else n * size
    return total


def quantized_summary(model: nn.Module) -> dict:
    """report.json's `quantize`: how many weights are 4-bit and their bytes, so the savings can be checked."""
    weights = [m.weight for m in model.modules() if isinstance(m, NF4Linear)]
    return {
        "method": "nf4",
        "block": BLOCK,
        "double_quantization": True,
        "modules": len(weights),
        "params": sum(w.numel() for w in weights),
        "bytes": sum(nf4_bytes(w.numel(), w.dtype.itemsize) for w in weights),
    }


def is_nf4(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "NF4Tensor" or type(getattr(tensor, "data", None)).__name__ == "NF4Tensor"
