"""The head-only, chunked loss must equal what the model itself computes over its full logits."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHITECTURES, VOCAB, tiny_model

from lorafit import loss as loss_module
from lorafit.inject import inject_lora
from lorafit.loss import IGNORE, HeadCrossEntropy, loss_sum, sequence_logprobs


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
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), reduction="sum")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loss_sum_matches_full_logits_cross_entropy(arch):
    model = tiny_model(arch)
    batch = _batch()
    ours, count = loss_sum(model, batch)
    assert count == int((batch["labels"][:, 1:] != IGNORE).sum())
    torch.testing.assert_close(ours, _reference_sum(model, batch), rtol=1e-5, atol=1e-5)


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
    logprobs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    expected = []
    for row in range(2):
        total = 0.0
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["labels"][row, t] != IGNORE:
                total += logprobs[row, t - 1, batch["labels"][row, t]].item()
        expected.append(total)
    torch.testing.assert_close(sequence_logprobs(model, batch), torch.tensor(expected), rtol=1e-5, atol=1e-5)
