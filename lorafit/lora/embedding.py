"""LoRA on an embedding table (loralib's `Embedding`, peft's `lora_embedding_A/B`). No Hugging Face knowledge.

The table E [vocab, d] gets ΔE = scaling · (B·A)ᵀ with A [r, vocab] and B [d, r]. A token's row of ΔE is
scaling · B·A[:, token], so the forward looks up A's column by token id and multiplies by B: never a dense
[vocab, d] update. A starts at zero and B random (loralib's and peft's choice), so training starts at the base.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.lora.linear import lora_scaling


class LoRAEmbedding(nn.Module):
    """base(ids) + scaling · B·A[:, ids], times the base's own `embed_scale` where it multiplies its output."""

    def __init__(self, base: nn.Embedding, rank: int, alpha: float, *, use_rslora: bool = False):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.dropout = nn.Identity()  # as peft: no dropout on token ids
        self.merged = False
        vocab, d = base.weight.shape
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.zeros(rank, vocab, **factory))
        self.lora_B = nn.Parameter(torch.empty(d, rank, **factory))
        self.reset_parameters()

    @property
    def weight_shape(self) -> tuple[int, int]:
        """(d, vocab): the table seen as a projection of one-hot token vectors."""
        vocab, d = self.base.weight.shape
        return d, vocab

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def lora_params(self) -> int:
        return self.lora_A.numel() + self.lora_B.numel()

    @property
    def max_rank(self) -> int:
        return min(self.base.weight.shape)

    def reset_parameters(self, init: str | None = None) -> None:
        if self.lora_A.is_meta:
            return
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)

    def _embed_scale(self, like: torch.Tensor):
        """The factor by which the base multiplies looked-up rows (Gemma: sqrt(d)); 1 for a plain table."""
        scale = getattr(self.base, "embed_scale", None)
        return 1.0 if scale is None else scale.to(like.dtype) if torch.is_tensor(scale) else scale

    def delta_weight(self) -> torch.Tensor:
        """ΔEᵀ [d, vocab], of `weight_shape` as every layer's ΔW (for merging only)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        if self.merged:
            return out
        # [.., r]: column `id` of A for each token, then up to d through B.
        z = F.embedding(ids, self.lora_A.t(), padding_idx=getattr(self.base, "padding_idx", None))
        delta = F.linear(z, self.lora_B) * self.scaling
        return out + (delta * self._embed_scale(delta)).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().t().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().t().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, embedding"
