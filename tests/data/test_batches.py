"""Each process's share of a step and of evaluation: every row once, and as many batches on every rank."""

from __future__ import annotations

import datasets
import pytest
import torch
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.data.batches import collate, supervised_count, supervised_counts
from lorafit.data.plan import eval_shares, global_batch_split, rank_share
from lorafit.data.tasks import IGNORE
from lorafit.errors import LorafitError
from lorafit.recipe import TrainSection


@pytest.mark.parametrize(("world", "batch_size", "grad_accum"), [(1, 8, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2), (4, 1, 2)])
def test_ranks_and_micro_batches_share_a_step_each_row_once(world, batch_size, grad_accum):
    step = [13, 4, 8, 1, 22, 9, 0, 7]
    shares = [rank_share(step, rank, world, batch_size, grad_accum) for rank in range(world)]
    assert all(len(share) == grad_accum for share in shares)
    assert sorted(i for share in shares for micro in share for i in micro) == sorted(step)


def test_a_short_last_step_leaves_empty_micro_batches_on_every_rank_alike():
    shares = [rank_share([3, 1, 2], rank, world=2, batch_size=2, grad_accum=2) for rank in range(2)]
    assert shares == [[[3, 1], []], [[2], []]]
    empty = collate([], pad_id=5)
    assert empty["input_ids"].shape == (1, 2) and supervised_count(empty["labels"]) == 0


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shares_give_every_rank_as_many_batches_and_every_row_once(world):
    shares = [eval_shares(11, rank, world, batch_size=2) for rank in range(world)]
    assert len({len(batches) for batches in shares}) == 1
    assert sorted(i for batches in shares for batch in batches for i in batch) == list(range(11))


def test_global_batch_sets_the_accumulation_for_the_process_count():
    settings = TrainSection(batch_size=4, global_batch=16)
    assert [global_batch_split(settings, world) for world in (1, 2, 4)] == [4, 2, 1]
    assert global_batch_split(TrainSection(batch_size=4, grad_accum=3), world=2) == 3


@pytest.mark.parametrize("keys", [{"global_batch": 12}, {"global_batch": 16, "grad_accum": 2}])
def test_global_batch_that_does_not_split_is_refused(keys):
    with pytest.raises(LorafitError, match="global_batch = .* is not a multiple of batch_size 8 × 2 processes"):
        global_batch_split(TrainSection(batch_size=8, **keys), world=2)


def test_global_batch_that_does_not_split_is_one_line_exit_2_with_nothing_written(tiny_recipe, tmp_path):
    path = tiny_recipe(train={"batch_size": 4, "global_batch": 10})
    result = CliRunner().invoke(app, ["train", "-r", str(path)])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "global_batch = 10" in result.stderr
    assert not (tmp_path / "run").exists()


def test_collated_positions_pick_what_the_label_mask_picks():
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE, IGNORE, 7, 8]},
            {"input_ids": [9, 10], "labels": [IGNORE, 10]},
            {"input_ids": [11, 12, 13], "labels": [IGNORE, IGNORE, IGNORE]}]
    batch = collate(rows, pad_id=0)
    states = torch.arange(batch["input_ids"].numel() * 2).reshape(*batch["input_ids"].shape, 2)
    by_mask = states[:, :-1][batch["labels"][:, 1:] != IGNORE]
    torch.testing.assert_close(states.reshape(-1, 2)[batch["positions"]], by_mask)
    assert batch["targets"].tolist() == [7, 8, 10] == batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE].tolist()


def test_supervised_counts_of_rows_laid_end_to_end_are_each_rows_own():
    rows = [{"labels": [3, 4, 5]}, {"labels": [IGNORE, 6]}, {"labels": [7]}, {"labels": [IGNORE, IGNORE, 8, 9]}]
    expected = [supervised_count(torch.tensor([row["labels"]])) for row in rows]
    examples = datasets.Dataset.from_list(rows, features=datasets.Features(
        {"labels": datasets.List(datasets.Value("int32"))}))
    assert supervised_counts(labels_of(examples)).tolist() == expected == [2, 1, 0, 2]
    assert supervised_counts(labels_of(examples.select([3, 1]))).tolist() == [2, 1]


def labels_of(examples: datasets.Dataset):
    return examples.with_format("arrow")["labels"]
