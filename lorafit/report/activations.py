"""Activation memory of a LoRA training step, estimated before any weight is read (`info`, the dry run, and
the choice of gradient checkpointing).

What autograd keeps between a step's forward and its backward is counted on the model itself: the model is
built from its config on fake tensors (shapes, no memory), wrapped for LoRA as training wraps it, and run
forward on a batch of the recipe's shape while a saved-tensors hook adds up what autograd saves. Built with 1
and with 2 decoder blocks, the difference is one block's share, so a model of any depth costs two tiny runs.
Not counted: the gradients and temporaries of the backward itself, and the allocator's slack.
"""

from __future__ import annotations

import copy

import torch

from lorafit.report.throughput import model_dims

CHUNK_BYTES = (1 << 24) * 4  # the loss head's logits chunk in fp32 (lorafit.model.loss.CHUNK_ELEMENTS)


def _saved_bytes(config, blocks: int, lora, rows: int, length: int, dtype: torch.dtype, autocast: bool) -> int:
    """Bytes of the tensors autograd saves in a LoRA forward of the trunk with `blocks` decoder blocks."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    from lorafit.lora.dropout import keyed_dropout
    from lorafit.model.experts import expert_parameters
    from lorafit.model.inject import wrap_targets
    from lorafit.model.load import fuse_activations
    from lorafit.model.masks import masks_without_host_reads

    config = copy.deepcopy(config)
    config.num_hidden_layers = blocks
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # Fake tensors run the experts' grouped matmul in bf16 only: such a model runs in bf16, its floating
        # tensors counted at `dtype`'s size (within 10% of a real fp32 forward's count on tiny Qwen3-MoE, Mixtral).
        run_dtype = torch.bfloat16 if dtype != torch.bfloat16 and expert_parameters(model) else None
        if run_dtype is not None:
            model = AutoModelForCausalLM.from_config(config, dtype=run_dtype)
        layers = wrap_targets(model, lora.model_copy(update={"init": "kaiming"}))
        fuse_activations(model)
        model.train()
        weights = {id(p) for p in model.parameters()}
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in weights and id(tensor._base) not in weights:  # a weight (or its transpose) is no activation
                size = dtype.itemsize if run_dtype and tensor.is_floating_point() else tensor.element_size()
                saved[id(tensor)] = tensor.numel() * size
            return tensor

        ids = torch.zeros(rows, length, dtype=torch.long)
        precision = torch.autocast("cpu", dtype=dtype, enabled=autocast)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), masks_without_host_reads(False), \
                keyed_dropout(layers.values(), 0, 0, range(rows), (rows, length)), precision:
            model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return sum(saved.values())


def activation_estimate(config, lora, *, rows: int, length: int, dtype: str = "float32", mixed_precision: str = "no",
                        supervised_fraction: float = 1.0) -> dict:
    """Activation bytes of one micro-batch of `rows` × `length` tokens, without and with gradient checkpointing.

    `lora` is the recipe's [lora] section; `config` the model's (its own dropout as training will have it).
    The loss head keeps the gradient of each supervised position's hidden state and one chunk of logits.
    With checkpointing, each block keeps only its input, and one block's activations live again in backward.
    """
    from lorafit.model.load import DTYPES

    weights = DTYPES[dtype]
    autocast = mixed_precision in ("bf16", "fp16")
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, weights)
    one = _saved_bytes(config, 1, lora, rows, length, weights, autocast)
    two = _saved_bytes(config, 2, lora, rows, length, weights, autocast)
    block, outside = two - one, 2 * one - two
    dims = model_dims(config)
    hidden = rows * length * dims["hidden"] * compute.itemsize  # one [rows, length, d] tensor
    head = round(hidden * supervised_fraction) + CHUNK_BYTES
    total = outside + dims["layers"] * block + head
    checkpointed = outside + dims["layers"] * hidden + block + head
    return {"rows": rows, "length": length, "per_block": block, "total": total, "checkpointed": checkpointed,
            "counted": "tensors autograd keeps for backward (measured on fake tensors); not backward's temporaries"}


def recipe_activations(recipe) -> dict:
    """`activation_estimate` for a recipe's model, LoRA and micro-batch (batch_size rows of max_length tokens)."""
    from lorafit.model.load import load_config, resolve_precision, switch_off_dropout

    config = load_config(recipe.model.name, trust_remote_code=recipe.model.trust_remote_code)
    if recipe.model.dropout == "off":
        switch_off_dropout(config)
    dtype, mixed_precision = resolve_precision(recipe.model.dtype, recipe.train.mixed_precision)
    return activation_estimate(config, recipe.lora, rows=recipe.train.batch_size, length=recipe.data.max_length,
                               dtype=dtype, mixed_precision=mixed_precision)
