"""Data at scale: a run's start keeps the tokenized rows in their memory-mapped Arrow table.

The planner, packing, the data fingerprint and collating a step read a few bytes a row (lengths, supervised
counts, digests) and the step's own rows, never a Python object per token: measured in a fresh process on a
200,000-row data set generated here, against the least that Python lists of its tokens would take.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

ROWS = 200_000
IGNORE = -100

CHILD = r"""
import json, sys
import datasets
from lorafit.data.batches import collate
from lorafit.data.plan import plan_training
from lorafit.data.tokenize import TokenizedSplit
from lorafit.recipe_file import validate

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

examples = datasets.Dataset.from_file(sys.argv[1])
collate([{"input_ids": [5, 6], "labels": [5, 6]}], 0)  # torch's own first-use allocations, which a run has made
growth = {}
for packing in (False, True):
    recipe = validate({"data": {"source": "x.jsonl", "task": "text", "max_length": 64, "packing": packing},
                       "train": {"batch_size": 16, "seed": 3}})
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak (VmHWM) starts again from here
    before = kib("VmRSS")
    plan = plan_training(recipe, TokenizedSplit(examples, dropped=0, total=len(examples)), global_batch=16)
    fingerprint = plan.fingerprint()
    first = collate(plan.units(plan.steps.rows(0)), 0)
    growth["packed" if packing else "plain"] = (kib("VmHWM") - before) * 1024
    del plan, first
print(json.dumps(growth))
"""


def write_tokenized(path, rows: int) -> int:
    """`rows` tokenized rows of 10-30 tokens with tokenize's columns, as an Arrow file; returns the token count."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 31, rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ids = rng.integers(1000, 50_000, int(offsets[-1])).astype(np.int32)
    labels = ids.copy()
    labels[offsets[:-1]] = IGNORE  # some positions without loss, as a prompt would leave
    table = pa.table({
        "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
        "labels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels)),
        "row": pa.array(np.arange(rows, dtype=np.int32)),
        "length": pa.array(lengths.astype(np.int32)),
        "supervised": pa.array((lengths - 1).astype(np.int32)),
        "digest": pa.array(rng.integers(-2**62, 2**62, rows)),
    })
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1000)  # record batches of 1,000 rows, as datasets writes them
    return int(offsets[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_200k_row_start_keeps_memory_below_what_python_lists_of_its_tokens_need(tmp_path):
    tokens = write_tokenized(tmp_path / "examples.arrow", ROWS)
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "examples.arrow")],
                            capture_output=True, text=True, timeout=300, check=True)
    growth = json.loads(result.stdout)
    # The loop once held the rows as Python lists (to_list): a list holds an 8-byte pointer per element, so the
    # input_ids and labels lists alone take 16 bytes a token. The plan may take a few bytes a row, none per token.
    bound = 8 * tokens
    assert growth["plain"] < bound and growth["packed"] < bound, (growth, bound)
