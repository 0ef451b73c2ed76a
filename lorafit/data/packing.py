"""`[data] packing`: tokenized rows laid end to end in sequences of up to max_length tokens, none seeing another.

A packed sequence carries its rows' lengths; `lorafit.data.batches.collate` turns them into position ids that restart
at every row and leaves the attention mask out. From position ids alone transformers builds a block-diagonal
causal mask (eager and SDPA attention) or runs variable-length kernels (flash attention), so a row attends to
itself only and is computed as if alone. Its first label is set to IGNORE, since unpacked no position predicts it.

Packing works from the rows' lengths alone (NumPy arrays, a few bytes a row); a sequence's tokens are read from
the rows when a batch needs them.
"""
from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lorafit.data.tasks import IGNORE
from lorafit.errors import LorafitError

# Model types whose transformers 5.x code reads restarting position ids as separate sequences (with use_cache off
# and no attention mask): tests/data/test_packing.py checks each against its rows run one by one. Left out on purpose:
# BLOOM (ALiBi built from the attention mask) and OPT (positions counted from the attention mask) mix the rows, and
# so does gpt-oss (measured, cause not traced). A mixture-of-experts layer routes token by token: packing changes
# nothing there.
PACKED_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox",
                                "qwen3_moe", "mixtral", "olmoe", "deepseek_v3"})


@dataclass
class Packed:
    """Which rows each packed sequence holds (`members[bounds[i]:bounds[i + 1]]`), and per sequence its tokens
    and supervised tokens."""

    members: np.ndarray  # row indices, sequence after sequence
    bounds: np.ndarray  # [sequences + 1] offsets into members
    lengths: np.ndarray  # tokens of each sequence
    supervised: np.ndarray  # supervised tokens of each sequence
    rows: int
    max_length: int

    def __len__(self) -> int:
        return len(self.lengths)

    def members_of(self, sequence: int) -> np.ndarray:
        return self.members[self.bounds[sequence]:self.bounds[sequence + 1]]

    def sequences(self, indices, read: Callable[[np.ndarray], list[dict]]) -> list[dict]:
        """The packed sequences `indices` (input_ids, labels, row_lengths), their rows fetched by one `read(rows)`."""
        parts = [self.members_of(int(index)) for index in indices]
        rows = iter(read(np.concatenate(parts)) if parts else [])
        sequences = []
        for members in parts:
            held = [next(rows) for _ in members]
            labels = [np.concatenate([[IGNORE], row["labels"][1:]]) for row in held]
            sequences.append({"input_ids": np.concatenate([row["input_ids"] for row in held]),
                              "labels": np.concatenate(labels),
                              "row_lengths": [len(row["input_ids"]) for row in held]})
        return sequences

    @property
    def fill(self) -> float:
        """The share of the sequences' room (sequences × max_length) that real tokens take."""
        return int(self.lengths.sum()) / (len(self) * self.max_length)

    def describe(self) -> str:
        why = self.packed_nothing()
        return (f"packing {self.rows:,} rows into {len(self):,} sequences of up to {self.max_length} "
                f"tokens ({self.fill:.1%} of their room filled)" + (f"; {why}" if why else ""))

    def summary(self) -> dict:
        why = self.packed_nothing()
        return {"rows": self.rows, "sequences": len(self), "fill": self.fill, **({"note": why} if why else {})}

    def packed_nothing(self) -> str | None:
        """Why no sequence holds two rows, and what would help; None when packing put rows together."""
        if len(self) != self.rows or self.rows < 2:
            return None
        lengths = np.sort(self.lengths)  # one row each
        shortest, median = int(lengths[0] + lengths[1]), int(lengths[len(lengths) // 2])
        return (f"no two rows fit in one sequence (the two shortest hold {shortest} tokens together, "
                f"the median row {median}), so packing saves nothing; raise [data] max_length (to {2 * median} for "
                "about two rows a sequence) where the model's context allows it, or set packing = false")


def check_packing(config) -> None:
    """Refuse packing for a model whose attention would let packed rows see each other."""
    if config.model_type not in PACKED_MODEL_TYPES:
        raise LorafitError(
            f"[data] packing is not supported for {config.model_type} models, whose attention would mix the packed "
            f"rows (supported: {', '.join(sorted(PACKED_MODEL_TYPES))}); set packing = false"
        )


def pack(lengths, supervised, max_length: int) -> Packed:
    """Pack rows of these lengths with best-fit decreasing; a pure function of the lengths, so every process agrees."""
    lengths = np.asarray(lengths, dtype=np.int64)
    members, bounds = best_fit(lengths, max_length)
    per_sequence = [np.add.reduceat(np.asarray(values, dtype=np.int64)[members], bounds[:-1])
                    for values in (lengths, supervised)]
    return Packed(members, bounds, *per_sequence, rows=len(lengths), max_length=max_length)


def best_fit(lengths, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(row indices bin after bin, [bins + 1] offsets): longest rows first (ties by index), each into the fullest
    bin it still fits, the lowest-numbered among equally full ones (a new bin if none fits).

    Bins are kept by the room they have left: a sorted list of the room values some bin has, and for each value a
    heap of its bins, so a row costs two bisections and a heap operation whatever the number of bins.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        index = int(np.argmax(lengths > capacity))
        raise ValueError(f"row {index} has {lengths[index]} tokens, more than the {capacity} a sequence holds")
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    bin_of = np.empty(len(lengths), dtype=np.int64)
    rooms: list[int] = []  # room values that some bin has, sorted
    bins_with: dict[int, list[int]] = {}  # room value -> heap of bin numbers
    count = 0
    for index, length in zip(order.tolist(), lengths[order].tolist()):
        at = bisect.bisect_left(rooms, length)
        if at == len(rooms):
            chosen, left = count, capacity
            count += 1
        else:
            left = rooms[at]
            chosen = heapq.heappop(bins_with[left])
            if not bins_with[left]:
                del rooms[at], bins_with[left]
        bin_of[index] = chosen
        left -= length
        if left > 0:
            if left not in bins_with:
                bisect.insort(rooms, left)
                bins_with[left] = []
            heapq.heappush(bins_with[left], chosen)
    members = order[np.argsort(bin_of[order], kind="stable")]  # each bin's rows in the order they went in
    bounds = np.concatenate([[0], np.cumsum(np.bincount(bin_of, minlength=count))]).astype(np.int64)
    return members, bounds
