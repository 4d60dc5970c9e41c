"""Aggregation rules over stacked client values: weighted mean (FedAvg), coordinate-wise
median, trimmed mean, and norm clipping before averaging; and the client-level
statistics that robust rules over sparse updates need (norm screening and clipping at
the round's median norm).

Dense rules take a list of per-client tensors of one shape and per-client weights, and
return one tensor. Robust rules ignore weights by design (a client must not buy
influence by claiming more examples); the mean rule weights by examples, which the
transports first cap at what the server knows of each client (`cap_examples`).

Sparse updates (FedKSeed: a few (seed, scalar) pairs per client over a pool of ~1024
seeds) have mostly disjoint supports, so a coordinate-wise median or trimmed mean over
clients is ~0 on every seed (or, on a seed one client touched, that client's value):
it neither learns nor resists. Robust statistics for them are taken over clients'
whole updates instead: `norm_outliers` screens each client's update norm against the
round's median in log space (MAD-scaled, never tighter than 10x nor looser than 100x the
median), and `median_clip` scales every client to at most the median norm, a clipping
bound taken from the data rather than a fixed setting.
"""

from __future__ import annotations

import math
import statistics

import torch

from edgetune.errors import ConfigError

AGGREGATORS = ("mean", "median", "trimmed-mean", "clip-mean", "centered-clip")
CC_ITERATIONS = 3  # centered clipping's fixed-point steps per round


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
    """The factor that brings a vector of `norm` within `bound` (1 if already inside).

    Raises:
        ConfigError: `bound` is not a finite positive number (a NaN bound must not turn
            clipping off).
    """
    check_bound("clip", bound)
    return 1.0 if norm <= bound or norm == 0 else bound / norm


def check_bound(name: str, bound: float | None) -> None:
    """Raise ConfigError unless `bound` is None or finite and > 0.

    Comparisons with NaN are all False, so `norm > nan` would accept everything; every
    bound a validator or clipper uses is checked here first.
    """
    if bound is not None and not (math.isfinite(bound) and bound > 0):
        raise ConfigError(f"fed.{name}: expected a finite number > 0, got {bound!r}")


# A client's update is an outlier when its norm exceeds the round's median by more than
# OUTLIER_MADS robust standard deviations in log space, but the limit is kept within
# [OUTLIER_RATIO, MAX_RATIO] x the median: honest ZO traces of a few steps vary a few-fold
# in norm (a chi distribution with few degrees of freedom, heavy-tailed estimates), an
# attack that matters is orders of magnitude larger. The upper clamp matters when
# attackers are many in a small round: their own norms inflate the MAD (5 clients, 2 at
# 1e4 and 3 honest between 5 and 30 put the MAD limit at ~6,600x the median).
OUTLIER_MADS, OUTLIER_RATIO, MAX_RATIO = 3.5, 10.0, 100.0


def norm_outliers(norms: list[float]) -> list[str | None]:
    """For each client, why its update norm is an outlier of the round, or None.

    Only the large side is screened: a small update has little influence, and a round
    of one or two clients screens nothing (no median to speak of).
    """
    if len(norms) < 3:
        return [None] * len(norms)
    logs = [math.log(max(n, 1e-30)) for n in norms]
    centre = statistics.median(logs)
    spread = 1.4826 * statistics.median(abs(x - centre) for x in logs)
    margin = min(max(OUTLIER_MADS * spread, math.log(OUTLIER_RATIO)), math.log(MAX_RATIO))
    median = math.exp(centre)
    return [
        None
        if x <= centre + margin
        else f"update norm {n:.3g} is {n / median:.3g}x the round's median {median:.3g} "
        "(an outlier; robust aggregation drops it)"
        for n, x in zip(norms, logs, strict=True)
    ]


def median_clip(norms: list[float]) -> list[float]:
    """Per-client factors that scale every update to at most the median norm."""
    bound = statistics.median(norms)
    return [1.0 if n <= bound or n == 0 else bound / n for n in norms]


def centered_clip(values: list[torch.Tensor], center: torch.Tensor, tau: float) -> torch.Tensor:
    """Centered clipping (Karimireddy, He and Jaggi, "Learning from History for
    Byzantine Robust Optimization", ICML 2021): starting from `center` (the previous
    round's aggregate, the server's momentum), CC_ITERATIONS times
    v <- v + mean_i clip_tau(x_i - v). A client moves v by at most tau / n per step,
    however far it lies, and honest clients near v are averaged as they are.
    """
    check_bound("clip", tau)
    v = center.double()
    for _ in range(CC_ITERATIONS):
        step = torch.zeros_like(v)
        for x in values:
            d = x.double() - v
            step += d * clip_scale(float(d.norm()), tau)
        v = v + step / len(values)
    return v.to(values[0].dtype)


def bucket_means(values: list[torch.Tensor], size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffle the clients and average them in buckets of `size` (Karimireddy, He and
    Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing", ICLR
    2022): a robust rule over bucket means sees less honest spread, so an attack that
    hides inside it stands out."""
    order = torch.randperm(len(values), generator=gen).tolist()
    groups = [order[i : i + size] for i in range(0, len(order), size)]
    return [
        torch.stack([values[i].double() for i in g]).mean(0).to(values[0].dtype) for g in groups
    ]


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
