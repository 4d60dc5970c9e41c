"""Choosing which units survive: a global ratio, or one ratio per layer.

For a unit kind with `n` units per layer, `round(ratio * n)` units are removed from a
layer: the lowest-scoring ones of that layer (ranked per layer, since scores of different
layers are not on one scale). Two ways to give the ratio:

- one global `ratio`: every layer keeps the same width, which stock transformers' Llama can
  load (one `intermediate_size`, one `num_attention_heads`). The kept key/value group count
  is then rounded to the nearest count whose query heads divide `hidden_size` (ties keep
  more), because stock transformers refuses any other (stories260K: 4 groups of 2 heads,
  hidden 64, so 3 groups become 2 or 4; SmolLM2-135M: 3 groups of 3, all counts load);
- `layer_ratios`, one ratio per decoder layer (e.g. prune late layers harder): widths
  differ per layer, the model is saved with per-layer widths (see `structured.py`) and the
  head count is taken as asked, no rounding;
- `ranking="global"`: one ratio for the whole model, but the units of all layers compete:
  each layer's scores are divided by that layer's mean score (so the layers' different
  scales cancel and what counts is how a unit compares with its layer's typical unit), and
  the `round(ratio * total)` lowest normalized units are removed wherever they are. Every
  layer keeps at least its best unit (with "layers" pruning, only the surviving layers'
  units compete). Widths come out per layer, as with `layer_ratios`.

Whole layers (unit kind "layers"): `round(ratio * num_layers)` layers with the lowest layer
scores are removed; `ratio` is always the global one. Combined with "mlp"/"heads", the
remaining layers also lose their width ratio (the global one, or their `layer_ratios` entry),
so `--prune 0.2 --prune-units mlp,layers` on 5 layers removes 1 layer and 20% of the channels
of the 4 left. Ties go to the lower index so the choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from edgetune.compress.prune.importance import UnitScores
from edgetune.compress.prune.units import KeptIndices, PruneError

RANKINGS = ("layer", "global")
"""Where units compete: within their layer (uniform widths) or across all layers."""

UNITS = ("mlp", "heads", "layers")
"""Unit kinds `select_kept` can prune: MLP channels, key/value head groups, decoder layers."""


def select_kept(
    scores: UnitScores,
    ratio: float,
    units: Iterable[str] = ("mlp", "heads"),
    layer_ratios: Sequence[float] | None = None,
    ranking: str = "layer",
) -> KeptIndices:
    """Keep the top `1 - ratio` of each unit kind in `units`; keep all of the others.

    Args:
        scores: per-layer unit importance (`magnitude_scores` / `activation_scores` / ...).
        ratio: fraction of units to remove, in [0, 1); with `layer_ratios` it applies to
            whole layers only.
        units: which kinds to prune, a subset of `UNITS`.
        layer_ratios: one width ratio per decoder layer for "mlp" / "heads" (None = `ratio`
            in every layer).
        ranking: "layer" (each layer loses `ratio` of its units) or "global" (normalized
            scores compete across layers; not with `layer_ratios`).

    Returns:
        The kept indices, sorted (one entry per original layer) and the kept layers.

    Raises:
        PruneError: a ratio is outside [0, 1), `layer_ratios` has the wrong length, a unit
            kind is unknown, the ratio leaves a layer with nothing, removes every layer, or
            asks for layer pruning of a 1-layer model.
    """
    num_layers = len(scores.mlp)
    widths = _width_ratios(ratio, layer_ratios, num_layers)
    units = list(units)
    unknown = [u for u in units if u not in UNITS]
    if unknown:
        raise PruneError(
            f"unknown prune unit(s) {', '.join(unknown)}; choose from {', '.join(UNITS)}."
        )
    if ranking not in RANKINGS or (ranking == "global" and layer_ratios is not None):
        raise PruneError(
            f"ranking {ranking!r} with layer_ratios={layer_ratios}: choose ranking from "
            f"{', '.join(RANKINGS)}, and give layer_ratios only with ranking 'layer'."
        )
    zero = [0.0] * num_layers
    layers = _keep_layers(scores.layer_scores(), ratio) if "layers" in units else None
    if ranking == "global":
        # only the surviving layers' units compete, so `ratio` is of the units left
        alive = range(num_layers) if layers is None else layers
        mlp = _keep_global(scores.mlp, alive, ratio if "mlp" in units else 0.0, "MLP channels")
        kv = _keep_global(
            scores.kv_groups, alive, ratio if "heads" in units else 0.0, "key/value heads"
        )
    else:
        mlp = _keep_per_layer(scores.mlp, widths if "mlp" in units else zero, "MLP channels")
        kv = _keep_per_layer(
            scores.kv_groups,
            widths if "heads" in units else zero,
            "key/value heads",
            allowed=scores.loadable_kv_counts if layer_ratios is None else None,
        )
    return KeptIndices(mlp=mlp, kv_groups=kv, layers=layers)


def _width_ratios(
    ratio: float, layer_ratios: Sequence[float] | None, num_layers: int
) -> list[float]:
    """The width ratio of every layer; raises `PruneError` for a value outside [0, 1)."""
    widths = [ratio] * num_layers if layer_ratios is None else list(layer_ratios)
    if len(widths) != num_layers:
        raise PruneError(
            f"layer_ratios has {len(widths)} values but the model has {num_layers} decoder "
            f"layers; give one ratio per layer, e.g. {','.join(['0.2'] * num_layers)}"
        )
    for value in [ratio, *widths]:
        if not 0.0 <= value < 1.0:
            raise PruneError(
                f"pruning ratio {value} is outside [0, 1); give the fraction of units to "
                "remove, e.g. 0.3 to remove 30%."
            )
    return widths


def _keep_layers(layer_scores: torch.Tensor, ratio: float) -> tuple[int, ...]:
    """The `L - round(ratio * L)` highest-scoring layers, sorted."""
    n = layer_scores.numel()
    if n < 2:
        raise PruneError(
            "layer pruning needs at least 2 decoder layers and this model has 1; drop "
            "'layers' from the prune units (prune mlp,heads instead)."
        )
    keep = n - round(ratio * n)
    if keep < 1:
        raise PruneError(
            f"ratio {ratio} removes all {n} decoder layers; use a ratio below "
            f"{(n - 0.5) / n:.3f} or leave 'layers' out of the prune units."
        )
    order = torch.sort(-layer_scores.double(), stable=True).indices[:keep]
    return tuple(sorted(int(j) for j in order))


def _keep_per_layer(
    per_layer: tuple[torch.Tensor, ...],
    ratios: list[float],
    what: str,
    allowed: tuple[int, ...] | None = None,
) -> tuple[tuple[int, ...], ...]:
    """The `n - round(ratio * n)` best indices of each layer (nearest `allowed` count), sorted."""
    kept = []
    for i, (scores, ratio) in enumerate(zip(per_layer, ratios, strict=True)):
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


def _keep_global(
    per_layer: tuple[torch.Tensor, ...], alive: Iterable[int], ratio: float, what: str
) -> tuple[tuple[int, ...], ...]:
    """Remove the `round(ratio * total)` lowest mean-normalized scores of the `alive` layers
    together; the other (removed) layers keep everything, as their entries are ignored."""
    alive = list(alive)
    normalized = [
        per_layer[i].double() / per_layer[i].double().abs().mean().clamp_min(1e-30) for i in alive
    ]
    sizes = [s.numel() for s in normalized]
    remove = round(ratio * sum(sizes))
    if remove > sum(sizes) - len(sizes):
        raise PruneError(
            f"ratio {ratio} removes {remove} of the {sum(sizes)} {what} of the model, but every "
            f"layer must keep one; use a ratio below {1 - len(sizes) / sum(sizes):.3f}."
        )
    for s in normalized:
        s[torch.argmax(s)] = float("inf")  # each layer's best unit always stays
    removed = set(torch.sort(torch.cat(normalized), stable=True).indices[:remove].tolist())
    kept = [tuple(range(t.numel())) for t in per_layer]
    offset = 0
    for i, n in zip(alive, sizes, strict=True):
        kept[i] = tuple(j for j in range(n) if offset + j not in removed)
        offset += n
    return tuple(kept)
