"""FwdLLM forward gradient: variance control decides the number of directions."""

from __future__ import annotations

import torch

from edgetune.zo.fwdgrad import ForwardGradientEstimator


def _quadratic(params, target):
    def loss() -> float:
        return float(
            sum(((p.double() - t) ** 2).sum() for p, t in zip(params, target, strict=True))
        )

    return loss


def _setup(d: int = 8):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(d, generator=gen, dtype=torch.float64)], [
        torch.randn(d, generator=gen, dtype=torch.float64)
    ]


def test_loose_threshold_stops_early_and_strict_threshold_hits_the_cap():
    params, target = _setup()
    loose = ForwardGradientEstimator(eps=1e-4, min_queries=2, max_queries=64, threshold=10.0)
    strict = ForwardGradientEstimator(eps=1e-4, min_queries=2, max_queries=64, threshold=1e-3)
    a = loose.estimate(_quadratic(params, target), params, 1)
    b = strict.estimate(_quadratic(params, target), params, 1)
    assert 2 <= len(a.seeds) < len(b.seeds) == 64
    assert a.extras["relative_variance"] <= 10.0
    assert b.forward_passes == 128


def test_discriminative_sampling_prefers_directions_along_the_prior():
    # Prepare: the prior is the true gradient
    params, target = _setup(16)
    grad = (2 * (params[0] - target[0])).float()
    plain = ForwardGradientEstimator(max_queries=8, threshold=0.0)
    picky = ForwardGradientEstimator(max_queries=8, threshold=0.0, candidates=16, prior=grad)
    # Execute
    a = plain.estimate(_quadratic(params, target), params, 3)
    b = picky.estimate(_quadratic(params, target), params, 3)
    # Assert: chosen directions carry larger directional derivatives on average
    mean_abs = lambda e: sum(abs(c) for c in e.scalars) / len(e.scalars)  # noqa: E731
    assert mean_abs(b) > 1.5 * mean_abs(a)
    assert len(set(b.seeds)) == 8
