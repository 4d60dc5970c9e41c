"""Batch order and learning-rate schedule: stateless and exact."""

from __future__ import annotations

import pytest

from edgetune.train.sampler import batch_indices
from edgetune.train.schedule import lr_at


def test_each_epoch_visits_every_example_once():
    # 10 examples, batch 4: steps 0..4 cover two epochs exactly
    seen = [i for step in range(5) for i in batch_indices(step, 10, 4, seed=3)]
    assert sorted(seen[:10]) == list(range(10))
    assert sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a new permutation each epoch


def test_batches_are_a_function_of_seed_and_step_only():
    assert batch_indices(7, 50, 8, seed=1) == batch_indices(7, 50, 8, seed=1)
    assert batch_indices(7, 50, 8, seed=1) != batch_indices(7, 50, 8, seed=2)


def test_batch_larger_than_dataset_wraps_around():
    out = batch_indices(0, 3, 7, seed=0)
    assert len(out) == 7 and set(out) == {0, 1, 2}


@pytest.mark.parametrize(
    "schedule, step, expected",
    [
        ("constant", 5, 1.0),
        ("linear", 2, 1.0),  # end of warm-up
        ("linear", 6, 0.5),  # halfway through decay: (6-2)/(10-2)
        ("cosine", 6, 0.5),
        ("cosine", 2, 1.0),
    ],
)
def test_lr_schedule_values(schedule, step, expected):
    assert lr_at(step, total=10, base=1.0, schedule=schedule, warmup=2) == pytest.approx(
        expected if step >= 2 else (step + 1) / 2
    )


def test_warmup_ramps_linearly():
    assert [lr_at(s, 10, 1.0, "constant", 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
