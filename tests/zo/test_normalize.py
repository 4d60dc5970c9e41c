"""zo.scale=rms: scalars divided by their running RMS, bounded, resumable, replayable."""

from __future__ import annotations

import math

import pytest

from edgetune.zo.estimate import ZOEstimate
from edgetune.zo.normalize import RMSNormalizer


def _est(*scalars: float) -> ZOEstimate:
    return ZOEstimate(seeds=list(range(len(scalars))), scalars=list(scalars), loss=1.0)


def test_the_first_step_is_unit_rms_and_a_steady_scale_stays_unit():
    norm = RMSNormalizer(beta=0.9)
    first = norm(_est(3.0, -4.0))
    assert first.scalars == pytest.approx([3.0 / math.sqrt(12.5), -4.0 / math.sqrt(12.5)])
    for _ in range(50):
        steady = norm(_est(2.0, -2.0))
    assert steady.scalars == pytest.approx([1.0, -1.0], rel=1e-2)
    assert steady.extras["scalar_rms"] == pytest.approx(2.0, rel=1e-2)


def test_a_spike_is_bounded_by_one_over_sqrt_one_minus_beta():
    norm = RMSNormalizer(beta=0.9)
    for _ in range(20):
        norm(_est(0.1))
    spike = norm(_est(1e6)).scalars[0]
    assert 2.5 < spike <= 1.0 / math.sqrt(0.1)


def test_a_growing_scale_no_longer_grows_the_step():
    # the raw scalars grow 5 % a step (18x over the run); the normalised ones settle at
    # sqrt((1 - beta / 1.05^2) / (1 - beta)) = 1.36
    norm = RMSNormalizer(beta=0.9)
    out = [abs(norm(_est(0.5 * 1.05**t)).scalars[0]) for t in range(60)]
    assert max(out[20:]) < 1.4 and out[-1] == pytest.approx(1.356, abs=0.01)


def test_state_round_trips_exactly_and_non_finite_scalars_pass_through():
    a, b = RMSNormalizer(), RMSNormalizer()
    for x in (0.3, 1.7, -2.2):
        a(_est(x))
    b.load_state_dict(a.state_dict())
    assert a(_est(0.9)).scalars == b(_est(0.9)).scalars
    nan = a(_est(float("nan")))
    assert math.isnan(nan.scalars[0]) and a.steps == b.steps
