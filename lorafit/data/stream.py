"""`[data] streaming`: a hub data set read as a stream, the examples a run needs drawn once and kept on disk.

The plan. Training draws the stream's first rows, in the data set's own order (no shuffle buffer: shuffle the
data set beforehand if its order is not random), tokenizes them, and stops at the first example at which it has
what `[train] max_steps` steps need (lorafit.data.plan.stream_draw): max_steps × global_batch examples, or with
packing max_steps × global_batch × max_length tokens. Those examples are written to an Arrow file in the datasets
cache, named by the data keys, the split, the tokenizer, this code and the amount drawn; from there on they are a
split like any other: the step plan shuffles and length-groups them by [train] seed, an epoch is one pass over
them (max_steps steps cover it about once), and a resume, a dry run or the other processes of the machine read the
same file. Should the file be gone, the same rows are drawn again; should the data set have changed meanwhile, the
run's data fingerprint tells a resume so. Evaluation draws the first max_eval_examples rows of its split.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
from datasets.arrow_writer import ArrowWriter
from datasets.utils.tqdm import tqdm

from lorafit.errors import LorafitError

DRAW_BATCH = 1000  # rows tokenized at a time


def drawn(stream: Callable[[], datasets.IterableDataset], encode_batch: Callable[[dict, list[int]], dict],
          features: datasets.Features, key: str, draw: tuple[int, int], check: Callable[[list[str]], None], where: str,
          progress: bool) -> datasets.Dataset:
    """The examples drawn from the rows `stream()` opens (all of them when `draw` is (0, 0)); the stream is not
    opened at all when the cache has them."""
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "lorafit"
    cache = folder / f"drawn-{key}.arrow"
    if not cache.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=folder, prefix=f".{cache.name}.", suffix=".tmp")
        os.close(handle)
        try:
            if not _draw(stream(), encode_batch, features, temp, draw, check, progress):
                raise LorafitError(f"no row of {where} has anything to predict; check the [data] fields")
            os.replace(temp, cache)
        finally:
            Path(temp).unlink(missing_ok=True)
    return datasets.Dataset.from_file(str(cache))


def _draw(rows, encode_batch, features, path: str, draw: tuple[int, int], check, progress: bool) -> int:
    """Tokenize rows into `path` until `draw` = (examples, tokens) are both reached; returns the examples written."""
    want_examples, want_tokens = draw
    limited = draw != (0, 0)
    examples = tokens = offset = 0
    with ArrowWriter(features=features, path=path) as writer, tqdm(
        total=want_examples or None, unit=" examples", desc="Drawing and tokenizing", disable=not progress
    ) as bar:
        for batch in rows.iter(batch_size=DRAW_BATCH):
            names = list(batch)
            if offset == 0:
                check(names)
            count = len(batch[names[0]])
            out = encode_batch(batch, list(range(offset, offset + count)))
            offset += count
            lengths = np.asarray(out["length"], dtype=np.int64)
            met = (examples + np.arange(1, len(lengths) + 1) >= want_examples) & (tokens + lengths.cumsum() >= want_tokens)
            keep = int(np.argmax(met)) + 1 if limited and met.any() else len(lengths)
            writer.write_batch({name: column[:keep] for name, column in out.items()})
            examples, tokens = examples + keep, tokens + int(lengths[:keep].sum())
            bar.update(keep)
            if limited and met.any():
                break
        writer.finalize()
    return examples
