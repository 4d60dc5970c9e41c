"""Aggregation rules over stacked client values: weighted mean (FedAvg), coordinate-wise
median, trimmed mean, and norm clipping before averaging.

Each rule takes a list of per-client tensors of one shape (or per-client scalars for
seed-based updates, as 0-d tensors) and per-client weights, and returns one tensor.
Robust rules ignore weights by design (a client must not buy influence by claiming
more examples); the mean rule weights by examples.
"""

from __future__ import annotations

import torch

AGGREGATORS = ("mean", "median", "trimmed-mean", "clip-mean")


def weighted_mean(values: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i v_i / sum_i w_i (accumulated in float64)."""
    total = sum(weights)
    out = torch.zeros_like(values[0], dtype=torch.float64)
    for v, w in zip(values, weights, strict=True):
        out += v.double() * (w / total)
    return out.to(values[0].dtype)


def median(values: list[torch.Tensor]) -> torch.Tensor:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    stacked = torch.stack([v.double() for v in values])
    return stacked.quantile(0.5, dim=0).to(values[0].dtype)


def trimmed_mean(values: list[torch.Tensor], trim: float) -> torch.Tensor:
    """Coordinate-wise mean after dropping the `trim` fraction of largest and smallest."""
    stacked, _ = torch.stack([v.double() for v in values]).sort(dim=0)
    k = int(trim * len(values))
    kept = stacked[k : len(values) - k] if len(values) - 2 * k > 0 else stacked
    return kept.mean(0).to(values[0].dtype)


def clip_scale(norm: float, bound: float) -> float:
    """The factor that brings a vector of `norm` within `bound` (1 if already inside)."""
    return 1.0 if norm <= bound or norm == 0 else bound / norm


def combine(
    values: list[torch.Tensor], weights: list[float], rule: str, trim: float = 0.1
) -> torch.Tensor:
    """Apply aggregation `rule` ("mean" | "median" | "trimmed-mean"; clip-mean clips
    upstream, per client, and then averages)."""
    if rule in ("mean", "clip-mean"):
        return weighted_mean(values, weights)
    if rule == "median":
        return median(values)
    if rule == "trimmed-mean":
        return trimmed_mean(values, trim)
    raise ValueError(f"unknown aggregator {rule!r}; valid: {', '.join(AGGREGATORS)}")
