"""Choosing which units survive: one global ratio, the same width in every layer.

For a unit kind with `n` units per layer, `round(ratio * n)` units are removed from every
layer: the lowest-scoring ones of that layer (ranked per layer, since scores of different
layers are not on one scale). Every layer thus keeps the same width, which is what stock
transformers' Llama can load (one `intermediate_size`, one `num_attention_heads` for the whole
model). The kept key/value group count is further rounded to the nearest count whose query
heads divide `hidden_size` (ties keep more), because stock transformers refuses to load any
other (stories260K: 4 groups of 2 heads, hidden 64, so 3 groups become 2 or 4; SmolLM2-135M:
3 groups of 3, hidden 576, all counts load). Per-layer ratios (non-uniform widths) are not implemented yet. Ties go to the lower
index so the choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from edgetune.compress.prune.importance import UnitScores
from edgetune.compress.prune.units import KeptIndices, PruneError

UNITS = ("mlp", "heads")
"""Unit kinds `select_kept` can prune: MLP intermediate channels and key/value head groups."""


def select_kept(scores: UnitScores, ratio: float, units: Iterable[str] = UNITS) -> KeptIndices:
    """Keep the top `1 - ratio` of each unit kind in `units`, per layer; keep all of the others.

    Args:
        scores: per-layer unit importance (`magnitude_scores` / `activation_scores`).
        ratio: fraction of units to remove, in [0, 1).
        units: which kinds to prune, a subset of `UNITS`.

    Returns:
        The kept indices, sorted, with the same count in every layer.

    Raises:
        PruneError: the ratio is outside [0, 1), a unit kind is unknown, or the ratio
            leaves a layer with nothing.
    """
    if not 0.0 <= ratio < 1.0:
        raise PruneError(
            f"pruning ratio {ratio} is outside [0, 1); give the fraction of units to remove, "
            "e.g. 0.3 to remove 30%."
        )
    units = list(units)
    unknown = [u for u in units if u not in UNITS]
    if unknown:
        raise PruneError(
            f"unknown prune unit(s) {', '.join(unknown)}; choose from {', '.join(UNITS)} "
            "(whole-layer pruning is not implemented yet)."
        )
    mlp = _keep_per_layer(scores.mlp, ratio if "mlp" in units else 0.0, "MLP channels")
    kv = _keep_per_layer(
        scores.kv_groups,
        ratio if "heads" in units else 0.0,
        "key/value heads",
        allowed=scores.loadable_kv_counts,
    )
    return KeptIndices(mlp=mlp, kv_groups=kv)


def _keep_per_layer(
    per_layer: tuple[torch.Tensor, ...],
    ratio: float,
    what: str,
    allowed: tuple[int, ...] | None = None,
) -> tuple[tuple[int, ...], ...]:
    """The `n - round(ratio * n)` best indices of each layer (nearest `allowed` count), sorted."""
    kept = []
    for i, scores in enumerate(per_layer):
        n = scores.numel()
        keep = n - round(ratio * n)
        if keep < 1:
            raise PruneError(
                f"ratio {ratio} removes all {n} {what} of layer {i}; use a ratio below "
                f"{(n - 0.5) / n:.3f} or leave this unit kind out."
            )
        if allowed:
            keep = min(allowed, key=lambda a: (abs(a - keep), -a))
        # stable sort on -score: equal scores keep the lower index first
        order = torch.sort(-scores.double(), stable=True).indices[:keep]
        kept.append(tuple(sorted(int(j) for j in order)))
    return tuple(kept)
