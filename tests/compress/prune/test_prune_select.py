"""Selecting kept units by one global ratio: uniform widths, loadable head counts, clear refusals."""

from __future__ import annotations

import pytest
import torch

from edgetune.compress.prune import PruneError, magnitude_scores, prune, select_kept
from edgetune.errors import EdgetuneError


def test_global_ratio_keeps_the_best_units_of_every_layer(stories):
    scores = magnitude_scores(stories)
    kept = select_kept(scores, 0.5)
    assert [len(k) for k in kept.mlp] == [86] * 5
    for layer in range(5):
        best = scores.mlp[layer].argsort(descending=True)[:86]
        assert kept.mlp[layer] == tuple(sorted(best.tolist()))
        best_groups = scores.kv_groups[layer].argsort(descending=True)[:2]
        assert kept.kv_groups[layer] == tuple(sorted(best_groups.tolist()))


def test_head_count_is_rounded_to_one_transformers_can_load(stories):
    # 4 groups of 2 query heads, hidden 64: 3 groups (6 heads) cannot load, so 0.3 keeps 4
    scores = magnitude_scores(stories)
    assert scores.loadable_kv_counts == (1, 2, 4)
    kept = select_kept(scores, 0.3)
    assert [len(k) for k in kept.kv_groups] == [4] * 5
    assert [len(k) for k in kept.mlp] == [120] * 5
    pruned = prune(stories, kept)
    assert pruned.config.intermediate_size == 120


def test_units_left_out_are_kept_whole(stories):
    kept = select_kept(magnitude_scores(stories), 0.5, units=["heads"])
    assert kept.mlp == (tuple(range(172)),) * 5
    assert [len(k) for k in kept.kv_groups] == [2] * 5


@pytest.mark.parametrize(
    ("ratio", "units", "message"),
    [
        (1.0, ["mlp"], r"outside \[0, 1\).*e\.g\. 0\.3"),
        (-0.1, ["mlp"], r"outside \[0, 1\)"),
        (0.9, ["heads"], r"removes all 4 key/value heads of layer 0; use a ratio below 0\.875"),
        (0.3, ["layers"], r"unknown prune unit\(s\) layers; choose from mlp, heads"),
    ],
)
def test_bad_requests_are_refused_naming_the_fix(stories, ratio, units, message):
    assert issubclass(PruneError, EdgetuneError)
    with pytest.raises(PruneError, match=message):
        select_kept(magnitude_scores(stories), ratio, units)


def test_ties_go_to_the_lower_index(stories):
    scores = magnitude_scores(stories)
    flat = type(scores)(
        mlp=tuple(torch.ones(172) for _ in range(5)),
        kv_groups=scores.kv_groups,
        loadable_kv_counts=scores.loadable_kv_counts,
    )
    assert select_kept(flat, 0.5, ["mlp"]).mlp[0] == tuple(range(86))
