"""Model setup: the composed tanh-GELUs are swapped for PyTorch's kernel without changing the function."""

from __future__ import annotations

import pytest
import torch
import transformers.activations
from conftest import ARCHITECTURES, tiny_model
from torch import nn

from lorafit.model.load import COMPOSED_TANH_GELUS, fuse_activations


@pytest.mark.parametrize("name", sorted(COMPOSED_TANH_GELUS))
def test_fused_gelu_matches_composed_activation_and_its_gradient(name):
    composed = getattr(transformers.activations, name)()
    fused = nn.GELU(approximate="tanh")
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4).requires_grad_()
    expected = composed(x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    actual = fused(x)
    (actual_grad,) = torch.autograd.grad(actual.sum(), x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-5, atol=1e-5)  # erf-GELU differs by 1e-3


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fuse_activations_keeps_logits(arch, tokens):
    model = tiny_model(arch)
    with torch.no_grad():
        before = model(tokens).logits
    swapped = fuse_activations(model)
    with torch.no_grad():
        after = model(tokens).logits
    assert swapped == (model.config.num_hidden_layers if arch == "gpt2" else 0)
    assert not any(type(m).__name__ in COMPOSED_TANH_GELUS for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def saved_bytes(model: nn.Module, tokens: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one training forward, counting each storage once."""
    storages: dict[int, int] = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(tokens).logits.sum().backward()
    return sum(storages.values())


def test_fused_gelu_keeps_one_mlp_activation_instead_of_four(tokens):
    model = tiny_model("gpt2").train()
    before = saved_bytes(model, tokens)
    fuse_activations(model)
    after = saved_bytes(model, tokens)
    config = model.config
    d_ff = 4 * config.n_embd
    one_activation = tokens.numel() * d_ff * 4  # [tokens, d_ff] in fp32
    assert before - after == 3 * one_activation * config.n_layer


@pytest.fixture
def gpt2_with_dropout(tmp_path):
    """The shipped tiny GPT-2 (weights and tokenizer) with its config's own dropout on, as GPT-2's hub config has it."""
    import json
    import shutil

    from conftest import TINY_MODEL

    folder = shutil.copytree(TINY_MODEL, tmp_path / "gpt2")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attn_pdrop": 0.1, "resid_pdrop": 0.1, "embd_pdrop": 0.1}))
    return str(folder)


def test_the_models_own_dropout_is_switched_off_at_load_or_kept_when_asked(gpt2_with_dropout, tokens):
    from lorafit.model.load import load_model, own_dropout

    kept = load_model(gpt2_with_dropout, dropout="config").train()
    assert own_dropout(kept.config) == {"attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1}
    assert not torch.equal(kept(input_ids=tokens).logits, kept(input_ids=tokens).logits)  # torch's RNG draws

    off = load_model(gpt2_with_dropout, dropout="off").train()
    assert own_dropout(off.config) == {}
    assert all(m.p == 0.0 for m in off.modules() if isinstance(m, nn.Dropout))
    with torch.no_grad():
        torch.testing.assert_close(off(input_ids=tokens).logits, kept.eval()(input_ids=tokens).logits)


def test_keeping_the_models_dropout_is_said_before_training(gpt2_with_dropout, tiny_recipe, tmp_path):
    from typer.testing import CliRunner

    from lorafit.cli import app

    recipe = tiny_recipe(model={"name": gpt2_with_dropout})
    kept = CliRunner().invoke(app, ["train", "-r", str(recipe), "--dry-run", "--set", "model.dropout=config"])
    assert kept.exit_code == 0, kept.output
    assert "keeps the model's own dropout (attn_pdrop 0.1, embd_pdrop 0.1, resid_pdrop 0.1)" in kept.output
    assert "depends on its number of processes" in kept.output
    off = CliRunner().invoke(app, ["train", "-r", str(recipe), "--dry-run"])
    assert off.exit_code == 0 and "own dropout" not in off.output
