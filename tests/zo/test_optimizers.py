"""The ZO optimizer family: one row each in a matrix. Every optimizer must descend on a
quadratic from exact directional derivatives, and be exactly replayable and resumable."""

from __future__ import annotations

import pytest
import torch

from edgetune.zo import derive_seed, direction_vector
from edgetune.zo.config import ZOConfig
from edgetune.zo.estimate import ZOEstimate
from edgetune.zo.optimizers import ZO_OPTIMIZERS, make_zo_optimizer

# name -> learning rate that suits it on this problem (sign moves every coordinate by lr)
CASES = {"sgd": 0.01, "momentum": 0.002, "adam": 0.02, "sign": 0.02}


def _problem():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(6, 5, generator=gen), torch.randn(7, generator=gen)]
    target = [torch.randn(6, 5, generator=gen), torch.randn(7, generator=gen)]
    return params, target


def _loss(params, target) -> float:
    return float(sum(((p - t) ** 2).sum() for p, t in zip(params, target, strict=True)))


def _estimate(params, target, step: int, q: int = 4) -> ZOEstimate:
    """Exact directional derivatives c_i = grad . z_i (isolates the optimizer from noise)."""
    grad = torch.cat([(2 * (p - t)).flatten() for p, t in zip(params, target, strict=True)])
    seeds = [derive_seed(9, step, i) for i in range(q)]
    scalars = [float(grad @ direction_vector(params, s)) for s in seeds]
    return ZOEstimate(seeds, scalars, loss=0.0)


def _run(name: str, steps: int, params, target, opt=None, start: int = 0):
    opt = opt or make_zo_optimizer(ZOConfig(optimizer=name), weight_decay=0.0)
    for step in range(start, start + steps):
        opt.step(params, _estimate(params, target, step), lr=CASES[name])
    return opt


def test_every_registered_optimizer_is_in_the_matrix():
    assert set(CASES) == set(ZO_OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_optimizer_descends(name):
    params, target = _problem()
    before = _loss(params, target)
    _run(name, 300, params, target)
    assert _loss(params, target) < 0.2 * before


@pytest.mark.parametrize("name", sorted(CASES))
def test_optimizer_resumes_exactly_from_its_state(name):
    # Prepare: one run straight through, one stopped at 20 and rebuilt from state_dict
    straight, target = _problem()
    _run(name, 40, straight, target)
    resumed, _ = _problem()
    opt = _run(name, 20, resumed, target)
    state = {k: v.clone() for k, v in opt.state_dict().items()}
    fresh = make_zo_optimizer(ZOConfig(optimizer=name), weight_decay=0.0)
    fresh.load_state_dict(state)
    # Execute
    _run(name, 20, resumed, target, opt=fresh, start=20)
    # Assert: bit-for-bit equal
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))


def test_weight_decay_shrinks_parameters_without_gradient():
    params = [torch.ones(3)]
    for name in CASES:
        p = [params[0].clone()]
        opt = make_zo_optimizer(ZOConfig(optimizer=name), weight_decay=0.5)
        opt.step(p, ZOEstimate([1], [0.0], 0.0), lr=0.1)
        assert torch.allclose(p[0], torch.full((3,), 0.95)), name
