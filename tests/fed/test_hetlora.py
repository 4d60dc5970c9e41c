"""Heterogeneous-rank LoRA aggregation rules."""

from __future__ import annotations

import torch

from edgetune.fed.aggregate import weighted_mean
from edgetune.fed.hetlora import aggregate_padded, aggregate_svd, truncate


def _pair(rank: int, seed: int, out: int = 6, inp: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen)


def test_equal_ranks_zero_padding_equals_plain_fedavg():
    pairs = [_pair(4, s) for s in range(3)]
    weights = [1.0, 2.0, 5.0]
    a, b = aggregate_padded([p[0] for p in pairs], [p[1] for p in pairs], weights, 4)
    assert torch.allclose(a, weighted_mean([p[0] for p in pairs], weights), atol=1e-6)
    assert torch.allclose(b, weighted_mean([p[1] for p in pairs], weights), atol=1e-6)


def test_padding_averages_each_component_over_the_clients_that_have_it():
    low, high = _pair(2, 0), _pair(4, 1)
    a, b = aggregate_padded([low[0], high[0]], [low[1], high[1]], [1.0, 3.0], 4)
    assert torch.allclose(a[:2], (low[0] + 3 * high[0][:2]) / 4, atol=1e-6)
    assert torch.allclose(a[2:], high[0][2:], atol=1e-6)  # not diluted by the rank-2 zeros
    assert torch.allclose(b[:, 2:], high[1][:, 2:], atol=1e-6)


def test_svd_reprojection_keeps_the_mean_weight_update_exactly():
    pairs = [_pair(2, 0), _pair(1, 1), _pair(2, 2)]
    weights = [1.0, 1.0, 2.0]
    a, b = aggregate_svd([p[0] for p in pairs], [p[1] for p in pairs], weights, 5)
    mean = sum(w * (p[1] @ p[0]) for p, w in zip(pairs, weights, strict=True)) / 4
    assert a.shape == (5, 5) and b.shape == (6, 5)
    assert torch.allclose(b @ a, mean, atol=1e-5)
    # a client of rank 2 gets the best rank-2 approximation (largest singular directions)
    a2, b2 = truncate(a, b, 2)
    err2 = torch.linalg.norm(b2 @ a2 - mean)
    s = torch.linalg.svdvals(mean)
    assert torch.isclose(err2, s[2:].norm(), atol=1e-5)
