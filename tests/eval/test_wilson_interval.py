"""The 95 % Wilson interval against values worked by hand and its edge cases."""

from __future__ import annotations

import pytest

from edgetune.eval.interval import wilson_interval


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        (50, 100, 0.40383, 0.59617),  # centre 0.5, half 1.96 / 1.03841 * 0.050951
        (0, 10, 0.0, 0.27753),  # never below 0, unlike p -+ 1.96 sqrt(p(1-p)/n) = [0, 0]
        (10, 10, 0.72247, 1.0),
        (430, 1000, 0.39964, 0.46089),
    ],
)
def test_wilson_interval_matches_hand_computed_values(successes, n, low, high):
    got = wilson_interval(successes, n)

    assert got == pytest.approx((low, high), abs=1e-5)


def test_wilson_interval_refuses_impossible_counts():
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)
