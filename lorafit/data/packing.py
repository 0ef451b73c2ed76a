"""`[data] packing`: tokenized rows laid end to end in sequences of up to max_length tokens, none seeing another.

A packed sequence carries its rows' lengths; `lorafit.data.batches.collate` turns them into position ids that restart
at every row and leaves the attention mask out. From position ids alone transformers builds a block-diagonal
causal mask (eager and SDPA attention) or runs variable-length kernels (flash attention), so a row attends to
itself only and is computed as if alone. Its first label is set to IGNORE, since unpacked no position predicts it.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from lorafit.data.tasks import IGNORE
from lorafit.errors import LorafitError

# Model types whose transformers 5.x code reads restarting position ids as separate sequences (with use_cache off
# and no attention mask): tests/data/test_packing.py checks each against its rows run one by one. Left out on purpose:
# BLOOM (ALiBi built from the attention mask) and OPT (positions counted from the attention mask) mix the rows.
PACKED_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox"})


@dataclass
class Packed:
    """The packed sequences (input_ids, labels, row_lengths), the rows in each, and their supervised tokens."""

    sequences: list[dict]
    members: list[list[int]]
    supervised: list[int]
    rows: int
    max_length: int

    @property
    def fill(self) -> float:
        """The share of the sequences' room (sequences × max_length) that real tokens take."""
        tokens = sum(len(sequence["input_ids"]) for sequence in self.sequences)
        return tokens / (len(self.sequences) * self.max_length)

    def describe(self) -> str:
        why = self.packed_nothing()
        return (f"packing {self.rows:,} rows into {len(self.sequences):,} sequences of up to {self.max_length} "
                f"tokens ({self.fill:.1%} of their room filled)" + (f"; {why}" if why else ""))

    def summary(self) -> dict:
        why = self.packed_nothing()
        return {"rows": self.rows, "sequences": len(self.sequences), "fill": self.fill, **({"note": why} if why else {})}

    def packed_nothing(self) -> str | None:
        """Why no sequence holds two rows, and what would help; None when packing put rows together."""
        if len(self.sequences) != self.rows or self.rows < 2:
            return None
        lengths = sorted(len(sequence["input_ids"]) for sequence in self.sequences)  # one row each
        median = lengths[len(lengths) // 2]
        return (f"no two rows fit in one sequence (the two shortest hold {lengths[0] + lengths[1]} tokens together, "
                f"the median row {median}), so packing saves nothing; raise [data] max_length (to {2 * median} for "
                "about two rows a sequence) where the model's context allows it, or set packing = false")


def check_packing(config) -> None:
    """Refuse packing for a model whose attention would let packed rows see each other."""
    if config.model_type not in PACKED_MODEL_TYPES:
        raise LorafitError(
            f"[data] packing is not supported for {config.model_type} models, whose attention would mix the packed "
            f"rows (supported: {', '.join(sorted(PACKED_MODEL_TYPES))}); set packing = false"
        )


def pack_rows(rows: list[dict], supervised: list[int], max_length: int) -> Packed:
    """Pack `rows` (input_ids, labels) with best-fit decreasing; a pure function of the rows, so every process agrees."""
    bins = best_fit([len(row["input_ids"]) for row in rows], max_length)
    sequences = []
    for members in bins:
        input_ids, labels = [], []
        for index in members:
            input_ids += rows[index]["input_ids"]
            labels += [IGNORE] + rows[index]["labels"][1:]
        sequences.append({"input_ids": input_ids, "labels": labels,
                          "row_lengths": [len(rows[index]["input_ids"]) for index in members]})
    counts = [sum(supervised[index] for index in members) for members in bins]
    return Packed(sequences, bins, counts, len(rows), max_length)


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Row indices per bin: longest rows first, each into the fullest bin it still fits (a new bin if none).

    Bins are kept sorted by the room they have left, so finding the best fit is a bisection.
    """
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"row {index} has {length} tokens, more than the {capacity} a sequence holds")
        at = bisect.bisect_left(room, (length, -1))
        if at == len(room):
            bins.append([])
            chosen, left = len(bins) - 1, capacity
        else:
            left, chosen = room.pop(at)
        bins[chosen].append(index)
        if left - length > 0:
            bisect.insort(room, (left - length, chosen))
    return bins
