"""FedSpine's per-device bandit: discounted UCB on synthetic stationary and drifting
problems, masks, the random-arms baseline, exact resume and input checks."""

from __future__ import annotations

import math

import pytest
import torch

from edgetune.fed.spine.bandit import DiscountedUCB, random_arm

ALL = [True] * 6


def _play(bandit, means_at, plays, seed, sigma=0.2, masks=None):
    """Play `plays` rounds with Gaussian rewards mean_at(t)[arm] + sigma * z_t; arms played."""
    noise = torch.randn(plays, generator=torch.Generator().manual_seed(seed)).tolist()
    arms = []
    for t in range(plays):
        arm = bandit.select(ALL if masks is None else masks[t])
        bandit.update(arm, means_at(t)[arm] + sigma * noise[t])
        arms.append(arm)
    return arms


def test_update_and_select_follow_the_discounted_ucb_formula():
    bandit = DiscountedUCB(3, discount=0.5, exploration=1.0)

    first = [bandit.select([True, True, True])]
    bandit.update(0, 1.0)
    first.append(bandit.select([True, True, True]))
    bandit.update(1, 0.0)
    bandit.update(2, -1.0)
    bandit.update(1, 0.5)

    # counts: arm0 .125, arm1 .5*.5+1 = 1.25, arm2 .5; sums: .125, .5, -.5
    assert first == [0, 1]
    assert bandit.state_dict()["counts"].tolist() == [0.125, 1.25, 0.5]
    assert bandit.means() == [1.0, 0.4, -1.0]
    log_n = math.log(0.125 + 1.25 + 0.5)
    ucb = [
        m + math.sqrt(2 * log_n / n)
        for m, n in zip([1.0, 0.4, -1.0], [0.125, 1.25, 0.5], strict=True)
    ]
    assert bandit.select([True, True, True]) == max(range(3), key=ucb.__getitem__) == 0
    assert bandit.select([False, True, True]) == 1  # ucb 1.40 vs 0.59
    assert ucb[1] > ucb[2]
    assert bandit.best() == 0 and bandit.best([False, True, True]) == 1


def test_stationary_problem_finds_the_best_arm():
    bandit = DiscountedUCB(6, discount=0.99)
    means = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]

    arms = _play(bandit, lambda t: means, 300, seed=0)

    last = arms[200:]
    assert max(range(6), key=last.count) == 5
    assert bandit.best() == 5


def test_discounting_follows_a_switch_that_plain_ucb_misses():
    # Arm 0 is terrible (-1) for 200 plays, then the best (0.9). Plain UCB wrote it off:
    # its count never decays, so its bonus stays too small to try it again; the
    # discounted bandit's count of arm 0 decays, the bonus grows and it finds the change.
    before = [-1.0, 0.2, 0.3, 0.4, 0.5, 0.6]
    after = [0.9, 0.2, 0.3, 0.4, 0.5, 0.6]
    means_at = lambda t: before if t < 200 else after  # noqa: E731

    # Exploration 0.5 for both: at 1.0 plain UCB's bonus still re-tries arm 0 and, once it
    # finds the change, plays it more than the discounted one, which keeps exploring.
    # Summed over seeds, since plain UCB finds the change in some runs (4 of 20 seeds).
    discounted = [_play(DiscountedUCB(6, 0.9, 0.5), means_at, 400, seed) for seed in range(5)]
    plain = [_play(DiscountedUCB(6, 1.0, 0.5), means_at, 400, seed) for seed in range(5)]

    assert all(max(range(6), key=arms[300:].count) == 0 for arms in discounted)
    assert min(arms[200:].count(0) for arms in discounted) > 40
    assert sum(a[200:].count(0) for a in discounted) > 2 * sum(a[200:].count(0) for a in plain)


def test_masked_arms_are_never_played():
    gen = torch.Generator().manual_seed(1)
    masks = []
    for _ in range(200):
        mask = (torch.rand(6, generator=gen) < 0.4).tolist()
        mask[int(torch.randint(6, (1,), generator=gen))] = True
        masks.append(mask)
    bandit = DiscountedUCB(6)

    arms = _play(bandit, lambda t: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 200, seed=1, masks=masks)

    assert all(masks[t][a] for t, a in enumerate(arms))
    assert len(set(arms)) == 6
    assert bandit.best([True, False, False, False, False, False]) == 0


def test_random_arm_is_uniform_over_allowed_and_deterministic():
    mask = [True, False, True, True, False, True]

    draws = [random_arm(mask, seed) for seed in range(200)]

    assert set(draws) == {0, 2, 3, 5}
    assert min(draws.count(a) for a in (0, 2, 3, 5)) > 30
    assert draws == [random_arm(mask, seed) for seed in range(200)]
    with pytest.raises(ValueError, match="allows no arm"):
        random_arm([False] * 4, seed=0)


def test_state_dict_round_trip_resumes_exactly():
    means = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    uninterrupted = DiscountedUCB(6)
    _play(uninterrupted, lambda t: means, 50, seed=2)
    resumed = DiscountedUCB(6)
    resumed.load_state_dict(uninterrupted.state_dict())

    expected = _play(uninterrupted, lambda t: means, 50, seed=3)
    got = _play(resumed, lambda t: means, 50, seed=3)

    assert got == expected
    assert torch.equal(resumed.state_dict()["sums"], uninterrupted.state_dict()["sums"])
    assert uninterrupted.state_dict()["counts"].dtype == torch.float64


def test_bad_inputs_raise_value_error():
    bandit = DiscountedUCB(6)

    with pytest.raises(ValueError, match="length 5, expected 6"):
        bandit.select([True] * 5)
    with pytest.raises(ValueError, match="allows no arm"):
        bandit.select([False] * 6)
    with pytest.raises(ValueError, match="finite"):
        bandit.update(0, math.nan)
    for arm in (6, -1):
        with pytest.raises(ValueError, match="arm must be"):
            bandit.update(arm, 0.0)
    with pytest.raises(ValueError, match="'sums' has shape"):
        bandit.load_state_dict({"counts": torch.zeros(6), "sums": torch.zeros(5)})
    with pytest.raises(ValueError, match="discount"):
        DiscountedUCB(6, discount=0.0)
