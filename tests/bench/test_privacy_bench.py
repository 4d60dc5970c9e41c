"""`bench privacy`'s membership-inference AUC: the Mann-Whitney statistic, ties halved."""

from __future__ import annotations

import itertools

import pytest

from edgetune.bench.privacy import auc


def _pairs(members, others):
    """P(member > other) + P(tie) / 2, by counting every pair."""
    wins = sum(
        1.0 if m > o else 0.5 if m == o else 0.0 for m, o in itertools.product(members, others)
    )
    return wins / (len(members) * len(others))


@pytest.mark.parametrize(
    "members, others",
    [
        ([3.0, 4.0], [1.0, 2.0]),  # perfectly separated: 1
        ([1.0, 2.0], [3.0, 4.0]),  # reversed: 0
        ([1.0, 2.0, 2.0, 5.0], [2.0, 0.5, 2.0]),  # ties across the groups
        ([0.1, 0.7, 0.3, 0.9, 0.2], [0.4, 0.6, 0.8]),
    ],
)
def test_auc_counts_every_member_nonmember_pair(members, others):
    assert auc(members, others) == pytest.approx(_pairs(members, others))
