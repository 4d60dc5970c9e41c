"""Selecting kept units: global ratio (uniform, loadable widths), per-layer ratios, whole layers, refusals."""

from __future__ import annotations

import pytest
import torch

from edgetune.compress.prune import (
    PruneError,
    UnitScores,
    activation_scores,
    magnitude_scores,
    prune,
    select_kept,
)
from edgetune.errors import EdgetuneError
from edgetune.models import tiny_llama


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
        (0.3, ["rows"], r"unknown prune unit\(s\) rows; choose from mlp, heads, layers"),
        (0.95, ["layers"], r"removes all 5 decoder layers; use a ratio below 0\.900"),
    ],
)
def test_bad_requests_are_refused_naming_the_fix(stories, ratio, units, message):
    assert issubclass(PruneError, EdgetuneError)
    with pytest.raises(PruneError, match=message):
        select_kept(magnitude_scores(stories), ratio, units)


def test_layer_ratios_give_each_layer_its_width_without_head_rounding(stories):
    scores = magnitude_scores(stories)
    kept = select_kept(scores, 0.0, ["mlp", "heads"], layer_ratios=[0.0, 0.1, 0.25, 0.5, 0.75])
    assert [len(k) for k in kept.mlp] == [172, 155, 129, 86, 43]
    # 0.25 of 4 groups = 3 kept, which stock transformers could not load: taken as asked
    assert [len(k) for k in kept.kv_groups] == [4, 4, 3, 2, 1]
    best = scores.mlp[3].argsort(descending=True)[:86]
    assert kept.mlp[3] == tuple(sorted(best.tolist()))


@pytest.mark.parametrize(
    ("layer_ratios", "message"),
    [
        ([0.1, 0.2], r"layer_ratios has 2 values but the model has 5 decoder layers"),
        ([0.1, 0.2, 1.0, 0.0, 0.0], r"pruning ratio 1\.0 is outside \[0, 1\)"),
    ],
)
def test_bad_layer_ratios_are_refused(stories, layer_ratios, message):
    with pytest.raises(PruneError, match=message):
        select_kept(magnitude_scores(stories), 0.0, ["mlp"], layer_ratios=layer_ratios)


def test_layers_unit_removes_the_lowest_scoring_layers(stories):
    scores = magnitude_scores(stories)
    layer_scores = scores.layer_scores()
    assert layer_scores.shape == (5,)
    expected = torch.stack(
        [m.sum() + g.sum() for m, g in zip(scores.mlp, scores.kv_groups, strict=True)]
    )
    torch.testing.assert_close(layer_scores, expected)
    kept = select_kept(scores, 0.4, ["layers"])  # round(0.4 * 5) = 2 layers go
    assert kept.layers == tuple(sorted(layer_scores.argsort(descending=True)[:3].tolist()))
    assert kept.mlp == (tuple(range(172)),) * 5  # widths untouched


def test_layers_with_widths_prune_the_remaining_layers_too(stories):
    kept = select_kept(magnitude_scores(stories), 0.2, ["mlp", "layers"])
    assert len(kept.layers) == 4
    assert [len(kept.mlp[i]) for i in kept.layers] == [138] * 4


def test_layer_pruning_of_a_one_layer_model_is_refused():
    one = tiny_llama(num_hidden_layers=1)
    with pytest.raises(PruneError, match="needs at least 2 decoder layers and this model has 1"):
        select_kept(magnitude_scores(one), 0.3, ["layers"])


def test_ties_go_to_the_lower_index(stories):
    scores = magnitude_scores(stories)
    flat = type(scores)(
        mlp=tuple(torch.ones(172) for _ in range(5)),
        kv_groups=scores.kv_groups,
        loadable_kv_counts=scores.loadable_kv_counts,
    )
    assert select_kept(flat, 0.5, ["mlp"]).mlp[0] == tuple(range(86))


def _two_layer_scores(layer1: list[float]) -> UnitScores:
    return UnitScores(
        mlp=(torch.ones(4), torch.tensor(layer1)),
        kv_groups=(torch.ones(2), torch.ones(2)),
        loadable_kv_counts=(1, 2),
    )


def test_global_ranking_lets_normalized_scores_compete_across_layers():
    # layer 0 is flat; layer 1 has one dominant channel, so its other three are the weakest
    # relative to their layer, whatever the layers' scales
    for scale in (1.0, 1000.0):
        scores = _two_layer_scores([10 * scale, 0.1 * scale, 0.2 * scale, 0.1 * scale])
        kept = select_kept(scores, 0.375, ["mlp"], ranking="global")  # 3 of 8 go
        assert kept.mlp == ((0, 1, 2, 3), (0,))
        assert kept.kv_groups == ((0, 1), (0, 1))


def test_global_ranking_keeps_every_layer_s_best_unit_or_refuses():
    scores = _two_layer_scores([1.0, 1.0, 1.0, 1.0])
    kept = select_kept(scores, 0.5, ["heads"], ranking="global")  # 2 of 4 groups go
    assert [len(k) for k in kept.kv_groups] == [1, 1]
    with pytest.raises(PruneError, match="every layer must keep one; use a ratio below 0.500"):
        select_kept(scores, 0.7, ["heads"], ranking="global")
    with pytest.raises(PruneError, match="give layer_ratios only with ranking 'layer'"):
        select_kept(scores, 0.0, ["mlp"], layer_ratios=[0.1, 0.1], ranking="global")


def test_global_ranking_on_stories_prunes_the_requested_total(stories, calib_ids, tmp_path):
    kept = select_kept(activation_scores(stories, [calib_ids]), 0.3, ["mlp"], ranking="global")
    assert sum(len(k) for k in kept.mlp) == 5 * 172 - round(0.3 * 5 * 172)
    assert len({len(k) for k in kept.mlp}) > 1  # widths differ per layer


def test_global_ranking_with_layers_counts_only_the_surviving_layers_units(stories, calib_ids):
    scores = activation_scores(stories, [calib_ids])
    kept = select_kept(scores, 0.4, ["mlp", "layers"], ranking="global")
    assert len(kept.layers) == 3
    assert sum(len(kept.mlp[i]) for i in kept.layers) == 3 * 172 - round(0.4 * 3 * 172)
    removed = [i for i in range(5) if i not in kept.layers]
    assert all(kept.mlp[i] == tuple(range(172)) for i in removed)
