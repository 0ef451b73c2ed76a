"""LoRA dropout keyed by the row: a row gets the same masks whichever process or micro-batch computes it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import supervised_rows, tiny_model

from lorafit.data.batches import collate
from lorafit.lora.dropout import dropout_keys, keep_mask, keyed_dropout, keys_for, layer_keys
from lorafit.lora.linear import LoRALinear
from lorafit.model.inject import inject_lora, lora_layers
from lorafit.model.loss import SupervisedLoss, loss_sum
from lorafit.recipe import LoraSection
from lorafit.train.step import prepare_model, train_step

P = 0.3


def masks(seed: int, step: int, rows: list[int], length: int, salt: int = 0, features: int = 64) -> torch.Tensor:
    return keep_mask(layer_keys(dropout_keys(seed, step, rows, length), salt + 1)[salt], features, P)


def python_keep(key: int, feature: int, p: float) -> bool:
    """The mask element of an int32 layer key and a feature, in Python integers mod 2^32: the hash as specified
    (feature multiplier, key × multiplier, one xorshift-multiply round, signed threshold), no torch arithmetic."""
    from lorafit.lora.dropout import FEATURE_MIX, ROUND_MIX

    def round_(h: int, multiplier: int) -> int:
        return ((h ^ (h >> 16)) * multiplier) % 2**32

    multiplier = round_(round_((feature + 0x7F4A7C15) * FEATURE_MIX % 2**32, FEATURE_MIX), FEATURE_MIX) | 1
    h = round_(key % 2**32 * multiplier % 2**32, ROUND_MIX)
    signed = h - 2**32 if h >= 2**31 else h
    return signed >= round(p * 2**32) - 2**31


def test_the_int32_hash_wraps_mod_2_to_the_32_as_specified():
    keys = layer_keys(dropout_keys(3, 1, [0, 7], 6), 2)[1]
    assert keys.dtype == torch.int32
    mask = keep_mask(keys, 40, P)
    expected = [[[python_keep(int(k), f, P) for f in range(40)] for k in row] for row in keys]
    assert mask.tolist() == expected


def test_features_and_positions_are_uncorrelated_beyond_sampling_noise():
    mask = masks(5, 0, list(range(32)), length=64, features=96).reshape(-1, 96).float()  # 2,048 positions
    by_feature = torch.corrcoef(mask.T) - torch.eye(96)
    by_position = torch.corrcoef(mask[:96]) - torch.eye(96)
    # a correlation estimated from n samples has a standard deviation near 1/sqrt(n); 6 of them is far outside noise
    assert by_feature.abs().max() < 6 / 2048**0.5
    assert by_position.abs().max() < 6 / 96**0.5


def test_a_rows_mask_is_the_same_wherever_it_sits_and_however_it_is_padded():
    together = masks(1, 3, [5, 9, 1], length=20)
    alone = masks(1, 3, [9], length=12)
    assert torch.equal(alone[0], together[1, :12])


@pytest.mark.parametrize("change", ["seed", "step", "row", "salt"])
def test_masks_differ_between_seeds_steps_rows_and_layers(change):
    base = {"seed": 1, "step": 3, "rows": [5], "length": 16, "salt": 0}
    other = {**base, **{"seed": {"seed": 2}, "step": {"step": 4}, "row": {"rows": [6]}, "salt": {"salt": 1}}[change]}
    assert not torch.equal(masks(**base), masks(**other))


def test_keep_rate_is_one_minus_p_and_positions_differ():
    mask = masks(7, 0, list(range(64)), length=64, features=256)
    assert mask.float().mean().item() == pytest.approx(1 - P, abs=0.005)
    assert not torch.equal(mask[:, 0], mask[:, 1])


def test_keyed_layer_scales_kept_inputs_and_zeroes_dropped_ones():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 8), rank=4, alpha=8, dropout=P).train()
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 16)
    keep = masks(1, 2, [3, 4], 5, features=16)
    expected = layer.base(x) + layer.scaling * ((x * keep / (1 - P)) @ layer.lora_A.T @ layer.lora_B.T)
    with keyed_dropout([layer], seed=1, step=2, rows=[3, 4], shape=(2, 5)):
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(layer(x), layer(x))  # the same keys give the same masks
    assert keys_for(layer) is None  # out of the block, nothing is left on the layer


def test_layers_keyed_together_draw_different_masks_for_the_same_rows():
    """Two identical layers fed the same input in one block: with one salt for all layers their outputs would agree."""
    torch.manual_seed(0)
    first = LoRALinear(torch.nn.Linear(16, 8), rank=4, alpha=8, dropout=P).train()
    torch.nn.init.normal_(first.lora_B)
    second = copy.deepcopy(first)
    x = torch.randn(2, 5, 16)
    with keyed_dropout([first, second], seed=1, step=2, rows=[3, 4], shape=(2, 5)):
        assert not torch.allclose(first(x), second(x))
        torch.testing.assert_close(first(x), first(x))


def moved(model, micro_batches: list[list[int]], data: list[dict]) -> dict[str, torch.Tensor]:
    """How far one SGD step at lr 1 on these micro-batches moves each LoRA weight: minus its gradient."""
    from accelerate import Accelerator

    model = copy.deepcopy(model).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator = Accelerator(cpu=True)
    scorer, optimizer = accelerator.prepare(SupervisedLoss(model), optimizer)
    batches = [{**collate([data[i] for i in indices], pad_id=1), "rows": indices} for indices in micro_batches]
    train_step(accelerator, scorer, optimizer, scheduler, batches, max_grad_norm=0.0, layers=lora_layers(model).values(),
               seed=5)
    return {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}


def lora_model(**switches) -> torch.nn.Module:
    model = tiny_model("gpt2")
    prepare_model(model, LoraSection(rank=2, alpha=4, dropout=P, targets=["q", "v"]), **switches)
    lora_dropouts = {id(layer.dropout) for layer in lora_layers(model).values()}
    for module in model.modules():  # GPT-2's own dropout off: only LoRA's is under test
        if isinstance(module, torch.nn.Dropout) and id(module) not in lora_dropouts:
            module.p = 0.0
    with torch.no_grad():
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B, std=0.1, generator=torch.Generator().manual_seed(2))
    return model


def test_one_batch_of_eight_moves_the_weights_as_two_micro_batches_of_four_with_dropout_on():
    model, data = lora_model(), supervised_rows()
    whole = moved(model, [[0, 1, 2, 3, 4, 5, 6, 7]], data)
    split = moved(model, [[6, 1, 3, 0], [2, 7, 5, 4]], data)
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-4, atol=1e-7)
    without_dropout = copy.deepcopy(model)
    for layer in lora_layers(without_dropout).values():
        layer.dropout.p = 0.0
    undropped = moved(without_dropout, [[0, 1, 2, 3, 4, 5, 6, 7]], data)
    assert any(not torch.allclose(undropped[name], grad) for name, grad in whole.items())  # dropout was on


def test_recomputed_checkpointed_activations_see_the_same_masks():
    data = supervised_rows()
    plain = moved(lora_model(), [[0, 1, 2, 3]], data)
    checkpointed = moved(lora_model(gradient_checkpointing=True), [[0, 1, 2, 3]], data)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-7)


def test_layers_without_dropout_are_left_unkeyed():
    model = tiny_model("gpt2")
    layers = inject_lora(model, ["q", "v"], rank=2, alpha=4, dropout=0.0)
    with keyed_dropout(layers.values(), 1, 0, [0], (1, 4)):
        assert all(keys_for(layer) is None for layer in layers.values())


def test_compiled_blocks_with_keyed_dropout_make_at_most_two_graphs_whatever_the_batch_shape(monkeypatch):
    """One graph for the first block (its input needs no gradient), one for all the others: no per-layer or
    per-shape recompiles. Dynamo's guards decide this, whatever the backend, so the test compiles to eager."""
    from torch._dynamo.utils import counters

    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **options: real_compile(self, backend="eager", **options))
    torch._dynamo.reset()
    model = lora_model(compile=True).train()
    layers = lora_layers(model)
    data = supervised_rows()
    before = counters["stats"]["unique_graphs"]
    for step, rows in enumerate([[0, 1, 2, 3], [4, 5, 6, 7], [1, 3]]):  # a new length, then a new batch size
        batch = collate([data[i] for i in rows], pad_id=1)
        with keyed_dropout(layers.values(), seed=0, step=step, rows=rows, shape=batch["input_ids"].shape):
            summed, _ = loss_sum(model, batch)
            summed.backward()
    assert counters["stats"]["unique_graphs"] - before <= 2
