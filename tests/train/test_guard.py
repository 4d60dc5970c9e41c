"""The divergence guard's decisions and a run's outcome, as pure functions (the runs that
use them: tests/recipes/test_guard_runs.py)."""

from __future__ import annotations

import pytest

from edgetune.train.config import TrainConfig
from edgetune.train.guard import Guard, better, headline
from edgetune.train.loop import LoopState
from edgetune.train.outcome import outcome


def _guard(**settings) -> Guard:
    return Guard(TrainConfig(guard_window=3, guard_margin=0.5, **settings))


def test_a_sustained_rise_fires_after_the_window_and_a_spike_does_not():
    # Prepare
    spike, rise = _guard(), _guard()
    # Execute: a flat loss with one spike; a flat loss that climbs and stays up
    spiked = [spike.observe_loss(x) for x in [1.0, 1.0, 1.0, 1.0, 4.0, 1.0, 1.0, 1.0, 1.0]]
    rising = [rise.observe_loss(x) for x in [1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0, 3.0]]
    # Assert: the spike lifts the average over the margin for fewer than 3 steps
    assert spiked == [None] * 9
    fired = [i for i, reason in enumerate(rising) if reason]
    assert fired and fired[0] == 6 and "smoothed loss" in rising[6]


def test_a_rollback_lowers_the_step_size_and_restarts_the_average():
    guard = _guard(guard_backoff=0.25)
    for x in [1.0, 1.0, 1.0]:
        guard.observe_loss(x)
    guard.rolled_back()
    guard.rolled_back()
    assert guard.state.lr_scale == pytest.approx(0.0625) and guard.state.rollbacks == 2
    assert guard.state.seen == 0 and guard.state.ema is None
    assert guard.state.best_ema == pytest.approx(1.0)  # the best is kept


def test_an_evaluation_well_below_the_best_fires_and_a_small_dip_does_not():
    guard = _guard(guard_drop=0.25)
    best = {"step": 20, "eval/accuracy": 0.8, "eval/loss": 0.5}
    assert guard.observe_eval({"eval/accuracy": 0.7, "eval/loss": 0.6}, best) is None
    reason = guard.observe_eval({"eval/accuracy": 0.5, "eval/loss": 0.9}, best)
    assert reason and "eval/accuracy 0.5" in reason and "step 20" in reason
    # a loss headline (language modelling) is better when lower
    lm_best = {"eval/loss": 2.0, "eval/perplexity": 7.4}
    assert guard.observe_eval({"eval/loss": 2.4}, lm_best) is None
    assert guard.observe_eval({"eval/loss": 2.6}, lm_best) is not None


def test_the_headline_ranks_evaluations_and_breaks_ties_on_the_loss():
    assert headline({"eval/rougeL": 0.2, "eval/loss": 1.0}) == ("eval/rougeL", True)
    assert headline({"eval/loss": 1.0, "eval/perplexity": 2.7}) == ("eval/loss", False)
    assert better({"eval/accuracy": 0.6, "eval/loss": 9.0}, {"eval/accuracy": 0.5})
    assert better(
        {"eval/accuracy": 0.5, "eval/loss": 0.4}, {"eval/accuracy": 0.5, "eval/loss": 0.5}
    )
    assert not better(
        {"eval/accuracy": 0.5, "eval/loss": 0.5}, {"eval/accuracy": 0.5, "eval/loss": 0.5}
    )
    assert better({"eval/loss": 1.0}, {"eval/loss": 1.5})


def test_the_outcome_warns_when_the_last_evaluation_is_below_the_first():
    # Prepare: evaluations at 0 (0.6), 10 (0.7, best) and 20 (0.4, last)
    state = LoopState(step=20, last_eval={"eval/accuracy": 0.4, "eval/loss": 1.2})
    state.first_eval = {"eval/accuracy": 0.6, "eval/loss": 1.0}
    state.best_eval = {"step": 10, "eval/accuracy": 0.7, "eval/loss": 0.9}
    # Execute
    best, last = outcome(state, keep_best=True), outcome(state, keep_best=False)
    # Assert: the kept adapter's figures are the summary's, the last beside them
    assert best["eval/accuracy"] == 0.7 and best["kept"] == {"policy": "best", "step": 10}
    assert best["last_eval"] == {"step": 20, "eval/accuracy": 0.4, "eval/loss": 1.2}
    assert "below the one before training (0.6)" in best["warnings"][0]
    assert "adapter of step 10" in best["warnings"][0]
    assert last["eval/accuracy"] == 0.4 and last["kept"] == {"policy": "last", "step": 20}
    assert "train.keep=last" in last["warnings"][0]
    # a run that ended above its start has no warning
    state.last_eval = {"eval/accuracy": 0.65, "eval/loss": 0.95}
    assert "warnings" not in outcome(state, keep_best=True)
