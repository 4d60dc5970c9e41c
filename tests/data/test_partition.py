"""Federated partitioning: coverage, determinism, skew and scheme parsing."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from edgetune.data import partition
from edgetune.errors import ConfigError, DataError

LABELS = [i % 10 for i in range(1000)]  # 10 balanced classes
SCHEMES = ["iid", "dirichlet:0.1", "dirichlet:10", "shards:1", "shards:3", "quantity:0.5"]


def _entropy(labels: list[int]) -> float:
    counts = np.array(list(Counter(labels).values()), dtype=float)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def _mean_label_entropy(parts: list[list[int]]) -> float:
    return float(np.mean([_entropy([LABELS[i] for i in part]) for part in parts]))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_assigns_each_index_to_exactly_one_nonempty_client(scheme):
    parts = partition(1000, 10, scheme, seed=0, labels=LABELS)

    assert len(parts) == 10
    assert all(parts)
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(1000))  # disjoint and covering
    assert all(part == sorted(part) for part in parts)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partitions_are_a_function_of_the_seed(scheme):
    first = partition(1000, 10, scheme, seed=7, labels=LABELS)

    again = partition(1000, 10, scheme, seed=7, labels=LABELS)
    other = partition(1000, 10, scheme, seed=8, labels=LABELS)

    assert first == again and first != other


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in partition(1003, 10, "iid", seed=0)]

    assert max(sizes) - min(sizes) <= 1


def test_small_dirichlet_alpha_skews_labels_more_than_large_alpha():
    skewed = np.mean(
        [_mean_label_entropy(partition(1000, 10, "dirichlet:0.1", s, LABELS)) for s in range(3)]
    )
    mixed = np.mean(
        [_mean_label_entropy(partition(1000, 10, "dirichlet:100", s, LABELS)) for s in range(3)]
    )

    assert skewed < 0.6 * mixed
    assert mixed > 0.9 * math.log(10)  # large alpha is close to uniform over 10 labels


def test_one_shard_per_client_gives_one_label_per_client():
    parts = partition(1000, 10, "shards:1", seed=0, labels=LABELS)

    assert [len({LABELS[i] for i in part}) for part in parts] == [1] * 10


def test_two_shards_per_client_give_at_most_two_labels():
    parts = partition(1000, 10, "shards:2", seed=0, labels=LABELS)

    assert max(len({LABELS[i] for i in part}) for part in parts) <= 2


def test_small_quantity_alpha_gives_more_unequal_sizes():
    small = np.std([len(p) for p in partition(1000, 10, "quantity:0.2", seed=0)])
    large = np.std([len(p) for p in partition(1000, 10, "quantity:100", seed=0)])

    assert small > 3 * large


def test_dirichlet_never_leaves_a_client_empty_even_with_tiny_alpha():
    parts = partition(30, 20, "dirichlet:0.01", seed=0, labels=[i % 3 for i in range(30)])

    assert all(parts) and sorted(i for p in parts for i in p) == list(range(30))


@pytest.mark.parametrize(
    "scheme",
    ["dirichlet", "dirichlet:-1", "dirichlet:abc", "shards:1.5", "shards:0", "iid:3", "zipf:2"],
)
def test_bad_scheme_strings_list_the_valid_forms(scheme):
    with pytest.raises(ConfigError) as info:
        partition(100, 4, scheme, seed=0, labels=[0] * 100)

    assert "dirichlet:ALPHA" in str(info.value) and "shards:K" in str(info.value)


def test_more_clients_than_examples_is_a_data_error():
    with pytest.raises(DataError, match="5 clients"):
        partition(3, 5, "iid", seed=0)


def test_label_schemes_need_labels():
    with pytest.raises(ConfigError, match="needs one label per example"):
        partition(100, 4, "dirichlet:0.5", seed=0)
