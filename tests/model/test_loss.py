"""The head-only, chunked loss must equal what the model itself computes over its full logits."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import ARCHITECTURES, LLAMA_SHAPE, SMALL, VOCAB, tiny_model

from lorafit.data.batches import supervised_count
from lorafit.data.tasks import IGNORE
from lorafit.model import loss as loss_module
from lorafit.model import targets
from lorafit.model.inject import inject_lora
from lorafit.model.loss import (
    PLAIN_HEAD_MODEL_TYPES,
    HeadCrossEntropy,
    logit_transform,
    loss_sum,
    plain_head,
    sequence_logprobs,
)


def _batch(lengths=(12, 7), supervise_from=3, seed=0):
    """Right-padded batch; labels supervise positions >= supervise_from of each row."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), 1)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    labels = torch.full((len(lengths), width), IGNORE)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(2, VOCAB, (length,), generator=generator)
        attention_mask[row, :length] = 1
        labels[row, supervise_from:length] = input_ids[row, supervise_from:length]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _reference_sum(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return _summed_cross_entropy(logits, batch["labels"])


def _summed_cross_entropy(logits, labels):
    """Token cross-entropies of next-token prediction, summed over the supervised positions."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum")


def _expected_logprobs(model, batch):
    """Each row's summed log-probability of its supervised tokens, read one by one off the model's own logits."""
    logprobs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    expected = []
    for row in range(batch["input_ids"].shape[0]):
        total = 0.0
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["labels"][row, t] != IGNORE:
                total += logprobs[row, t - 1, batch["labels"][row, t]].item()
        expected.append(total)
    return torch.tensor(expected)


def _with_nonzero_lora(model):
    """LoRA on q and v with B drawn at random, so the adapter changes the logits."""
    inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    return model


def tiny_softcapped_gemma2():
    """Gemma-2 with its own cap, 30 * tanh(logits / 30); weights drawn wide so that logits reach the cap."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        **LLAMA_SHAPE, head_dim=8, final_logit_softcapping=30.0, initializer_range=0.5, **SMALL
    )
    return _with_nonzero_lora(transformers.AutoModelForCausalLM.from_config(config).eval())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loss_sum_matches_full_logits_cross_entropy(arch):
    model = tiny_model(arch)
    batch = _batch()
    ours, count = loss_sum(model, batch)
    assert count == int((batch["labels"][:, 1:] != IGNORE).sum()) == supervised_count(batch["labels"])
    assert plain_head(model) is model.get_output_embeddings()  # the head-only path is the one checked
    torch.testing.assert_close(ours, _reference_sum(model, batch), rtol=1e-5, atol=1e-5)


def test_every_plain_head_model_type_is_checked_against_its_own_logits():
    assert PLAIN_HEAD_MODEL_TYPES <= set(ARCHITECTURES)


def test_softcapped_gemma2_loss_matches_its_own_labels_loss(monkeypatch):
    monkeypatch.setitem(targets.ARCHITECTURES, "gemma2", targets.ARCHITECTURES["llama"])  # the day it is added
    model = tiny_softcapped_gemma2()
    batch = _batch()
    ours, count = loss_sum(model, batch)
    theirs = model(**batch).loss
    torch.testing.assert_close(ours / count, theirs, rtol=1e-5, atol=1e-6)
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    head_only = _summed_cross_entropy(model.get_output_embeddings()(hidden), batch["labels"]) / count
    assert abs(head_only - theirs) > 0.1  # the head without the cap is far off: the test can tell the two apart


def test_softcapped_gemma2_sequence_logprobs_are_its_own_logits_logprobs():
    model = tiny_softcapped_gemma2()
    batch = _batch()
    torch.testing.assert_close(sequence_logprobs(model, batch), _expected_logprobs(model, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("config_class", "attribute"),
    [
        ("Gemma2Config", "final_logit_softcapping"),
        ("CohereConfig", "logit_scale"),
        ("Cohere2Config", "logit_scale"),
        ("GraniteConfig", "logits_scaling"),
        ("GraniteMoeConfig", "logits_scaling"),
        ("FalconH1Config", "lm_head_multiplier"),
        ("RecurrentGemmaConfig", "logits_soft_cap"),
    ],
)
def test_models_that_scale_or_cap_their_logits_are_named_by_their_config(config_class, attribute):
    if not hasattr(transformers, config_class):
        pytest.skip(f"transformers has no {config_class}")
    assert logit_transform(getattr(transformers, config_class)()) == attribute


@pytest.mark.parametrize("config_class", ["CohereConfig", "GraniteConfig"])
def test_scaled_logit_models_take_their_own_logits(config_class):
    if not hasattr(transformers, config_class):
        pytest.skip(f"transformers has no {config_class}")
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**LLAMA_SHAPE, **SMALL)
    model = _with_nonzero_lora(transformers.AutoModelForCausalLM.from_config(config).eval())
    assert plain_head(model) is None
    batch = _batch()
    torch.testing.assert_close(loss_sum(model, batch)[0], _reference_sum(model, batch), rtol=1e-5, atol=1e-5)


def test_listed_model_type_whose_config_transforms_logits_takes_its_own_logits():
    model = tiny_model("llama")
    assert plain_head(model) is not None
    model.config.logit_scale = 0.5
    assert plain_head(model) is None


def test_loss_matches_transformers_mean_loss_without_padding():
    model = tiny_model("gpt2")
    batch = _batch(lengths=(10, 10), supervise_from=0)
    ours, count = loss_sum(model, batch)
    theirs = model(**batch).loss
    torch.testing.assert_close(ours / count, theirs, rtol=1e-5, atol=1e-6)


def test_head_cross_entropy_gradient_matches_autograd(monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 3 * 50)  # several chunks of 3 rows
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight, bias = torch.randn(50, 8), torch.randn(50)
    targets = torch.randint(0, 50, (10,))
    ours = HeadCrossEntropy.apply(hidden, weight, bias, targets)
    (ours * 2.0).backward()
    grad_ours = hidden.grad.clone()
    hidden.grad = None
    reference = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    (reference * 2.0).backward()
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad_ours, hidden.grad)


def test_lora_gradients_match_full_logits_loss():
    model = tiny_model("gpt2")
    inject_lora(model, ["q", "v"], rank=2, alpha=4)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    batch = _batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(loss_sum(model, batch)[0], trainable)
    theirs = torch.autograd.grad(_reference_sum(model, batch), trainable)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_right_padding_does_not_change_a_rows_loss():
    model = tiny_model("llama")
    padded = _batch(lengths=(12, 7))
    alone = {k: v[1:, :7] for k, v in padded.items()}
    torch.testing.assert_close(sequence_logprobs(model, padded)[1], sequence_logprobs(model, alone)[0])


def test_sequence_logprobs_sums_each_rows_token_logprobs():
    model = tiny_model("gpt_neox")
    batch = _batch()
    torch.testing.assert_close(sequence_logprobs(model, batch), _expected_logprobs(model, batch), rtol=1e-5, atol=1e-5)


def test_head_cross_entropy_with_label_smoothing_matches_f_cross_entropy(monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 3 * 50)  # several chunks of 3 rows
    torch.manual_seed(1)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight, bias = torch.randn(50, 8), torch.randn(50)
    targets = torch.randint(0, 50, (10,))
    ours = HeadCrossEntropy.apply(hidden, weight, bias, targets, 0.1)
    (ours * 3.0).backward()
    grad_ours = hidden.grad.clone()
    hidden.grad = None
    reference = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum", label_smoothing=0.1)
    (reference * 3.0).backward()
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad_ours, hidden.grad)
    assert not torch.allclose(ours, F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum"))


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])  # the head-only path, and a model scored on its own logits
def test_label_smoothed_loss_and_lora_gradients_match_f_cross_entropy_on_the_full_logits(arch):
    if arch == "gemma2":
        model = tiny_softcapped_gemma2()
    else:
        model = tiny_model("gpt2")
        inject_lora(model, ["q", "v"], rank=2, alpha=4)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param)
    assert (plain_head(model) is None) == (arch == "gemma2")
    batch = _batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    ours, count = loss_sum(model, batch, label_smoothing=0.1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    theirs = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), reduction="sum",
                             label_smoothing=0.1)
    assert count == supervised_count(batch["labels"])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ours, trainable), torch.autograd.grad(theirs, trainable)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
