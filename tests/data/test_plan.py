"""The plan of a run: which rows each step takes (every row once per epoch, the same whoever asks), and the
learning-rate factor at each step."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from lorafit.data.plan import StepRows
from lorafit.train.optimizer import lr_factor

# ---------------------------------------------------------------- the schedule


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # warmup 2, total 10: warmup gives (s+1)/3, then decay over the 8 remaining steps.
        ("linear", {0: 1 / 3, 1: 2 / 3, 2: 1.0, 4: 0.75, 6: 0.5, 9: 0.125, 10: 0.0, 12: 0.0}),
        (
            "cosine",
            {
                0: 1 / 3,
                1: 2 / 3,
                2: 1.0,
                4: (1 + math.cos(math.pi / 4)) / 2,
                6: 0.5,
                8: (1 + math.cos(3 * math.pi / 4)) / 2,
                10: 0.0,
                13: 0.0,
            },
        ),
        ("constant", {0: 1 / 3, 1: 2 / 3, 2: 1.0, 7: 1.0, 10: 1.0, 50: 1.0}),
    ],
)
def test_lr_factor_matches_hand_computed_values(schedule, expected):
    for step, factor in expected.items():
        assert lr_factor(step, warmup=2, total=10, schedule=schedule) == pytest.approx(factor, abs=1e-12), step


def test_lr_factor_without_warmup_starts_at_full_rate():
    assert lr_factor(0, warmup=0, total=4, schedule="linear") == 1.0
    assert lr_factor(2, warmup=0, total=4, schedule="linear") == 0.5
    assert lr_factor(0, warmup=0, total=4, schedule="cosine") == 1.0


# ---------------------------------------------------------------- the rows of each step


def plan_steps(plan: StepRows, steps: range) -> list[list[int]]:
    return [plan.rows(step) for step in steps]


@pytest.mark.parametrize("grouped", [False, True])
def test_plan_covers_each_row_once_per_epoch(grouped):
    lengths = [(7 * i) % 23 + 1 for i in range(41)]
    plan = StepRows(lengths, global_batch=8, seed=5, group_by_length=grouped)
    assert plan.steps_per_epoch == 6  # 41 rows in steps of at most 8
    for epoch in range(3):
        steps = plan_steps(plan, range(epoch * 6, (epoch + 1) * 6))
        assert all(1 <= len(step) <= 8 for step in steps)
        assert sorted(i for step in steps for i in step) == list(range(41))


@pytest.mark.parametrize("grouped", [False, True])
def test_plan_is_deterministic_whatever_order_steps_are_asked_in(grouped):
    lengths = [(5 * i) % 17 + 1 for i in range(30)]
    forward = plan_steps(StepRows(lengths, 6, seed=9, group_by_length=grouped), range(15))
    backward = plan_steps(StepRows(lengths, 6, seed=9, group_by_length=grouped), range(14, -1, -1))[::-1]
    assert forward == backward


@pytest.mark.parametrize("grouped", [False, True])
def test_plan_epochs_and_seeds_give_different_orders(grouped):
    lengths = [(5 * i) % 17 + 1 for i in range(30)]
    plan = StepRows(lengths, 3, seed=9, group_by_length=grouped)
    per_epoch = plan.steps_per_epoch
    assert plan_steps(plan, range(per_epoch)) != plan_steps(plan, range(per_epoch, 2 * per_epoch))
    other_seed = StepRows(lengths, 3, seed=10, group_by_length=grouped)
    assert plan_steps(plan, range(per_epoch)) != plan_steps(other_seed, range(per_epoch))


def mean_length_spread(lengths: list[int], batches: list[list[int]]) -> float:
    """How much the lengths of a batch's rows differ, on average over the batches (population std)."""
    return statistics.fmean(statistics.pstdev([lengths[i] for i in batch]) for batch in batches if len(batch) > 1)


def test_ungrouped_steps_are_random_samples_and_grouped_steps_one_length_band():
    """[data] group_by_length = false must draw each step as a random sample of the rows (as peft's loop does), so
    that a comparison with peft (issue 29) differs only by chance; grouped steps hold rows of about one length."""
    rng = random.Random(1)
    lengths = [rng.randint(2, 180) for _ in range(3200)]
    # the independent reference: batches of 16 drawn at random by another generator
    draw = random.Random(11)
    sampled = mean_length_spread(lengths, [draw.sample(range(len(lengths)), 16) for _ in range(2000)])
    plain = StepRows(lengths, global_batch=16, seed=3, group_by_length=False)
    assert mean_length_spread(lengths, plan_steps(plain, range(plain.steps_per_epoch))) == pytest.approx(sampled, rel=0.05)
    grouped = StepRows(lengths, global_batch=16, seed=3)  # the default
    assert mean_length_spread(lengths, plan_steps(grouped, range(grouped.steps_per_epoch))) < sampled / 10
