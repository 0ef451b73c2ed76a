"""A training forward and backward never read the batch on the host: on a GPU each read waits for the device.

A CPU stand-in for tests/train/test_gpu.py's sync count: a dispatch mode records every op that hands a tensor's
value to Python (`.item()`, `bool(tensor)`, `nonzero`), which on CUDA is a device-to-host copy and a wait.
"""

from __future__ import annotations

import pytest
import torch
from conftest import supervised_rows, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from lorafit.data.batches import collate
from lorafit.lora.dropout import keyed_dropout
from lorafit.model.loss import loss_sum
from lorafit.model.masks import is_padded, masks_without_host_reads
from lorafit.recipe import LoraSection
from lorafit.train.step import prepare_model

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default, aten.item.default}


class HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's values on the host."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [4, 4]], ids=["padded", "unpadded"])
def test_a_keyed_training_forward_and_backward_read_nothing_on_the_host(rows):
    model = tiny_model("gpt2").train()
    layers = prepare_model(model, LoraSection(rank=2, alpha=4, dropout=0.1, targets=["q", "v"]))
    data = supervised_rows()
    batch = collate([data[i] for i in rows], pad_id=1)
    padded = is_padded(batch)
    assert padded == (rows != [4, 4])
    loss_sum(model, batch)[0].backward()  # once outside: first calls may set things up
    with HostReads() as recorded, masks_without_host_reads(padded), \
            keyed_dropout(layers.values(), seed=0, step=1, rows=rows, shape=batch["input_ids"].shape):
        loss_sum(model, batch)[0].backward()
    assert recorded.reads == []


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_masks_told_whether_a_batch_is_padded_give_transformers_own_logits(arch, attention):
    """Mistral's sliding window takes transformers' other mask function: it must come out the same too."""
    import transformers

    config = tiny_model(arch).config
    config._attn_implementation = attention
    if arch == "mistral":
        config.sliding_window = 4  # shorter than the rows, so that the window shows
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    data = supervised_rows()
    for rows in ([0, 1, 2, 3], [4, 4]):
        batch = collate([data[i] for i in rows], pad_id=1)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            expected = model(**inputs).logits
            with masks_without_host_reads(is_padded(batch)):
                found = model(**inputs).logits
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(found[real], expected[real], rtol=1e-5, atol=1e-5)
