"""Per-tensor index maps: named axes from a real adapter, gather/scatter, per-coordinate
aggregation (equal to HetLoRA's padding for rank prefixes), JSON and shape checks."""

from __future__ import annotations

import json

import pytest
import torch

from edgetune.fed.aggregate import combine
from edgetune.fed.algorithms.base import trainable_state
from edgetune.fed.hetlora import aggregate_deltas, truncate_state
from edgetune.fed.payloads import PayloadError
from edgetune.fed.shapes import (
    IndexMap,
    check_shapes,
    gather,
    lora_axes,
    scatter,
    scatter_combine,
)
from edgetune.peft import PeftConfig, attach


@pytest.fixture(scope="module")
def stories_model(stories260k_path):
    from edgetune import models

    torch.set_num_threads(1)
    model, _ = models.load(str(stories260k_path))
    return model


def _adapter(model, method="lora", rank=4):
    import copy

    return attach(copy.deepcopy(model), PeftConfig(method=method, rank=rank), seed=0)


def _random_state(state, seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=gen) for n, t in state.items()}


def _rule(name):
    return lambda values, weights: combine(values, weights, name, 0.25)


def test_axes_come_from_the_lora_modules_of_a_real_adapter(stories_model):
    lora = _adapter(stories_model)
    fa = _adapter(stories_model, method="lora-fa")
    last_n = _adapter(stories_model, method="last-n")

    axes, fa_axes, whole = lora_axes(lora), lora_axes(fa), lora_axes(last_n)

    assert list(axes) == lora.names
    a_names = [n for n in axes if ".lora_A." in n]
    b_names = [n for n in axes if ".lora_B." in n]
    assert len(a_names) == len(b_names) == 35  # 7 projections of 5 layers
    assert all(axes[n] == {"rank": 0, "in": 1} for n in a_names)
    assert all(axes[n] == {"out": 0, "rank": 1} for n in b_names)
    params = dict(lora.model.named_parameters())
    assert {params[n].shape[axes[n]["rank"]] for n in axes} == {4}
    assert list(fa_axes) == fa.names == b_names  # LoRA-FA trains B only
    assert all(fa_axes[n] == {"out": 0, "rank": 1} for n in b_names)
    assert whole and all(a == {} for a in whole.values())  # not LoRA: held whole


def test_gather_then_scatter_restores_the_global_tensors(stories_model):
    adapter = _adapter(stories_model)
    state = _random_state(trainable_state(adapter), 0)
    axes = lora_axes(adapter)
    kept_in = torch.tensor([0, 3, 7, 40, 63])
    imap = IndexMap.keep(axes, state, {"rank": torch.tensor([1, 2]), "in": kept_in})

    part = gather(state, imap)
    into = {n: torch.zeros_like(t) for n, t in state.items()}
    scatter(into, part, imap)

    name_a = next(n for n in state if ".lora_A." in n)
    name_b = next(n for n in state if ".lora_B." in n)
    assert part[name_a].shape == (2, 5) and part[name_b].shape == (state[name_b].shape[0], 2)
    assert torch.equal(part[name_a], state[name_a][1:3][:, kept_in])
    assert {n: t.shape for n, t in part.items()} == imap.shapes(state)
    held = torch.zeros_like(state[name_a], dtype=torch.bool)
    held[1:3, kept_in] = True
    assert torch.equal(into[name_a][held], state[name_a][held])
    assert not into[name_a][~held].any()
    assert torch.equal(into[name_b][:, 1:3], state[name_b][:, 1:3])
    part[name_a].add_(1)  # gather clones
    assert not torch.equal(part[name_a], state[name_a][1:3][:, kept_in])


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed-mean"])
def test_rank_prefixes_combine_bit_for_bit_as_hetlora(stories_model, rule):
    adapter = _adapter(stories_model)
    reference = trainable_state(adapter)
    axes = lora_axes(adapter)
    ranks, weights = [1, 4, 2, 4, 2], [1.0, 3.0, 2.0, 5.0, 4.0]
    deltas = [truncate_state(_random_state(reference, s), r) for s, r in enumerate(ranks)]
    maps = [IndexMap.rank_prefix(axes, reference, r) for r in ranks]

    got = scatter_combine(reference, list(zip(deltas, maps, strict=True)), weights, _rule(rule))
    expected = aggregate_deltas(deltas, weights, reference, _rule(rule))

    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_full_maps_are_plain_combine_over_whole_tensors(stories_model):
    adapter = _adapter(stories_model)
    reference = trainable_state(adapter)
    deltas = [_random_state(reference, s) for s in range(3)]
    weights = [1.0, 2.0, 5.0]
    full = IndexMap.rank_prefix(lora_axes(adapter), reference, 4)  # rank >= R: whole

    got = scatter_combine(reference, [(d, full) for d in deltas], weights, _rule("mean"))

    assert full == IndexMap.full()
    for name in reference:
        assert torch.equal(got[name], combine([d[name] for d in deltas], weights, "mean"))


def test_channel_maps_combine_each_coordinate_over_its_holders():
    reference = {"a": torch.zeros(2, 4), "b": torch.zeros(3, 2)}
    axes = {"a": {"rank": 0, "in": 1}, "b": {"out": 0, "rank": 1}}
    map0 = IndexMap.keep(axes, reference, {"in": torch.tensor([0, 1, 2])})
    map1 = IndexMap.keep(axes, reference, {"in": torch.tensor([1, 3]), "rank": torch.tensor([1])})
    part0 = {"a": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), "b": torch.ones(3, 2)}
    part1 = {"a": torch.tensor([[10.0, 30.0]]), "b": torch.full((3, 1), 7.0)}

    got = scatter_combine(reference, [(part0, map0), (part1, map1)], [1.0, 3.0], _rule("mean"))

    # a[0, :] only client 0 holds (client 1 keeps rank 1); a[1, 1] both; a[1, 3] client 1
    expected_a = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, (5.0 + 3 * 10.0) / 4, 6.0, 30.0]])
    expected_b = torch.tensor([[1.0, (1.0 + 3 * 7.0) / 4]] * 3)
    assert torch.equal(got["a"], expected_a)
    assert torch.equal(got["b"], expected_b)


def test_a_coordinate_held_by_one_client_gets_that_clients_value():
    reference = {"w": torch.zeros(4, 3)}
    axes = {"w": {"out": 0, "in": 1}}
    maps = [
        IndexMap.keep(axes, reference, {"out": torch.tensor([0, 1])}),
        IndexMap.keep(axes, reference, {"out": torch.tensor([1, 2])}),
    ]
    parts = [{"w": torch.full((2, 3), 2.0)}, {"w": torch.full((2, 3), -5.0)}]

    for rule in ("mean", "median", "trimmed-mean"):
        got = scatter_combine(
            reference, list(zip(parts, maps, strict=True)), [9.0, 1.0], _rule(rule)
        )
        assert torch.equal(got["w"][0], torch.full((3,), 2.0))  # not diluted by client 1
        assert torch.equal(got["w"][2], torch.full((3,), -5.0))  # nor by client 0's weight
        assert torch.equal(got["w"][3], torch.zeros(3))  # nobody holds row 3
    mean = scatter_combine(
        reference, list(zip(parts, maps, strict=True)), [9.0, 1.0], _rule("mean")
    )
    assert torch.allclose(mean["w"][1], torch.full((3,), (9 * 2.0 - 5.0) / 10))


def test_json_round_trip_and_describe(stories_model):
    adapter = _adapter(stories_model)
    reference = trainable_state(adapter)
    imap = IndexMap.keep(
        lora_axes(adapter), reference, {"rank": torch.tensor([0, 2]), "in": torch.arange(0, 64, 2)}
    )

    back = IndexMap.from_json(imap.to_json(), reference)

    assert back == imap
    assert back != IndexMap.full()
    assert json.loads(imap.to_json())["version"] == 1
    assert imap.describe() == {"mapped": 70, "kept": {"0": [2], "1": [2, 32]}}
    assert IndexMap.full().describe() == {"mapped": 0, "kept": {}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "object with version"),
        ('{"version": 1, "tensors": {"a": {"0": [2, 1]}}}', "sorted, unique"),
        ('{"version": 1, "tensors": {"a": {"0": [1, 1]}}}', "sorted, unique"),
        ('{"version": 1, "tensors": {"a": {"0": [-1]}}}', "list of ints >= 0"),
        ('{"version": 1, "tensors": {"a": {"0": [0.5]}}}', "list of ints >= 0"),
        ('{"version": 1, "tensors": {"a": {"x": [0]}}}', "is not a small int"),
        ('{"version": 1, "tensors": {"a": [0]}}', "must map axes"),
        ('{"version": 1, "tensors": {"zzz": {"0": [0]}}}', "tensor the adapter lacks"),
        ('{"version": 1, "tensors": {"a": {"2": [0]}}}', "the tensor has 2"),
        ('{"version": 1, "tensors": {"a": {"1": [0, 5]}}}', "index 5 on axis 1 of size 3"),
    ],
)
def test_bad_json_is_rejected_with_the_reason(text, message):
    reference = {"a": torch.zeros(2, 3)}

    with pytest.raises(PayloadError, match=message):
        IndexMap.from_json(text, reference)


def test_check_shapes_catches_what_the_map_does_not_plan():
    reference = {"a": torch.zeros(4, 6), "b": torch.zeros(5, 4)}
    axes = {"a": {"rank": 0, "in": 1}, "b": {"out": 0, "rank": 1}}
    imap = IndexMap.rank_prefix(axes, reference, 2)
    good = {"a": torch.zeros(2, 6), "b": torch.zeros(5, 2)}

    assert check_shapes(good, reference, imap) is None
    assert "expected (2, 6)" in check_shapes({**good, "a": torch.zeros(4, 6)}, reference, imap)
    assert "float64" in check_shapes({**good, "b": good["b"].double()}, reference, imap)
    assert "missing ['b']" in check_shapes({"a": good["a"]}, reference, imap)
    assert "unexpected ['c']" in check_shapes({**good, "c": torch.zeros(1)}, reference, imap)
    bad_map = IndexMap({"a": {0: torch.tensor([0, 9])}})
    assert "index 9 on axis 0 of size 4" in check_shapes(good, reference, bad_map)
    with pytest.raises(ValueError, match="client 1: a: got"):
        scatter_combine(reference, [(good, imap), (reference, imap)], [1.0, 1.0], _rule("mean"))


def test_constructors_reject_bad_indices():
    reference = {"a": torch.zeros(4, 6)}
    axes = {"a": {"rank": 0, "in": 1}}

    with pytest.raises(ValueError, match="of size 6"):
        IndexMap.keep(axes, reference, {"in": torch.tensor([0, 6])})
    with pytest.raises(ValueError, match="no axis 'out'"):
        IndexMap.keep(axes, reference, {}, per_tensor={"a": {"out": torch.tensor([0])}})
    with pytest.raises(ValueError, match="rank must be >= 1"):
        IndexMap.rank_prefix(axes, reference, 0)
    with pytest.raises(ValueError, match="int64"):
        IndexMap({"a": {0: torch.tensor([0.0])}})


def test_random_maps_of_many_clients_equal_a_per_coordinate_loop():
    reference = {"w": torch.zeros(3, 5)}
    axes = {"w": {"out": 0, "in": 1}}
    gen = torch.Generator().manual_seed(0)
    parts, maps, weights = [], [], []
    for c in range(40):
        # holder sets differ only after the first 32 clients (one renumbering step)
        keep = {
            a: torch.randperm(n, generator=gen)[: 1 + c % n].sort().values
            for a, n in (("out", 3), ("in", 5))
            if c >= 32
        }
        imap = IndexMap.keep(axes, reference, keep)
        maps.append(imap)
        parts.append({"w": torch.randn(imap.shapes(reference)["w"], generator=gen)})
        weights.append(float(1 + c % 7))
    placed = []
    for part, imap in zip(parts, maps, strict=True):
        into = {"w": torch.full((3, 5), float("nan"))}
        scatter(into, part, imap)
        placed.append(into["w"])

    got = scatter_combine(reference, list(zip(parts, maps, strict=True)), weights, _rule("mean"))

    for i in range(3):
        for j in range(5):
            holders = [c for c in range(40) if not placed[c][i, j].isnan()]
            values = [placed[c][i, j].reshape(1) for c in holders]
            expected = combine(values, [weights[c] for c in holders], "mean") if holders else 0.0
            assert torch.equal(got["w"][i, j].reshape(1), torch.as_tensor(expected).reshape(1))
