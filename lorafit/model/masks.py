"""Attention masks made without the host reading the batch, so that a step on a GPU never waits for the device.

transformers decides whether SDPA may run with `is_causal` instead of a mask by reading the padding mask on
the host (`padding_mask.all()`, twice when the batch holds padding): each read makes the host wait for the
device. The training step knows on the host whether a batch holds padding (it collated it there) and says
so; inside `masks_without_host_reads` transformers then builds exactly the mask it would have built, without
the reads. (Packed batches, which carry position ids instead of a mask, still cost transformers one read.)
"""

from __future__ import annotations

from contextlib import contextmanager


def _told_sdpa_mask(padded: bool):
    """transformers' SDPA mask function, told by the host whether the batch holds padding."""
    from transformers.masking_utils import sdpa_mask

    def mask(*args, attention_mask=None, allow_is_causal_skip: bool = True, **kwargs):
        if not padded:  # an all-ones mask adds nothing to the causal one: transformers' check sees no mask either
            return sdpa_mask(*args, attention_mask=None, allow_is_causal_skip=allow_is_causal_skip, **kwargs)
        return sdpa_mask(*args, attention_mask=attention_mask, allow_is_causal_skip=False, **kwargs)

    return mask


@contextmanager
def masks_without_host_reads(padded: bool):
    """Inside the block, models on SDPA attention build their masks for a batch that holds padding or not."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    local = ALL_MASK_ATTENTION_FUNCTIONS._local_mapping
    previous = local.get("sdpa")
    local["sdpa"] = _told_sdpa_mask(padded)
    try:
        yield
    finally:
        if previous is None:
            local.pop("sdpa", None)
        else:
            local["sdpa"] = previous


def is_padded(batch: dict) -> bool:
    """Whether a collated batch, still on the host, holds padding that its attention mask hides."""
    mask = batch.get("attention_mask")
    return mask is not None and not bool(mask.all())
