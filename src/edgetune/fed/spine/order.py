"""FedSpine's global unit ordering: one importance score per prunable unit, and what follows.

The server keeps ONE ordering of the prunable units of a Llama-layout model (MLP channels
[L, I] and key/value head groups [L, G]; whole layers are never pruned here). A device at
pruning ratio `p` trains the sub-model `kept(p)`: the top `1 - p` of each layer by this
ordering (`select_kept` with units "mlp" and "heads"). Because one ordering decides every
ratio, the sub-models are NESTED: `kept(p2)` is a subset of `kept(p1)` whenever `p2 >= p1`,
so every device's model is a sub-model of the global one and of every denser device's.

Scores are float64 and each layer's row has mean 1. The mean-1 normalization is what lets
scores of different sources and scales be averaged: devices report forward-only activation
scores (`submodel.client_stats`) over the units they held, the server normalizes each
report per layer over those units and averages, coordinate by coordinate, over the clients
that held it (`UnitOrder.update`):

    s_c[i, j] = x_c[i, j] / mean_{j' held by c in layer i} x_c[i, j']
    s[i, j]   = sum_{c holds j} w_c s_c[i, j] / sum_{c holds j} w_c   (else s[i, j] unchanged)
    s[i, :]  <- s[i, :] / mean(s[i, :])

Also here: the sparsity schedule (`schedule`, cubic ramp of Zhu & Gupta 2017, "To prune,
or not to prune"), the parameter count of a sub-model from config numbers alone
(`kept_params`), the part of the global LoRA adapter a sub-model of LoRA rank `r` holds
(`index_map`, an `edgetune.fed.shapes.IndexMap`), and the wire form of a `KeptIndices`
(`pack_kept` / `unpack_kept`: bit masks, about 6 KB for SmolLM2-135M).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from edgetune.compress.prune import KeptIndices, UnitScores, lora_index_map, select_kept
from edgetune.fed.shapes import Axes, IndexMap

Report = tuple[KeptIndices, torch.Tensor, torch.Tensor, float]
"""One client's statistics: the units it held, its mlp and kv scores (flat), its weight."""

MLP_KEPT, KV_KEPT, KEPT_SHAPE = "spine.mlp_kept", "spine.kv_kept", "spine.kept_shape"
"""The tensor names of a packed `KeptIndices` (`pack_kept`)."""

# the decoder projection a LoRA tensor belongs to, e.g. "model.layers.3.mlp.down_proj" in
# "base_model.model.model.layers.3.mlp.down_proj.lora_A.default.weight"
_PROJECTION = re.compile(r"(?:^|\.)(model\.layers\.\d+\.(?:self_attn|mlp)\.[A-Za-z0-9_]+_proj)\.")


@dataclass(eq=False)
class UnitOrder:
    """The global importance of every unit: mlp [L, I] and kv [L, G], float64, each layer's
    row normalized to mean 1 (so scores from different sources/scales can be averaged).

    Attributes:
        mlp: MLP channel scores [num_layers, intermediate_size].
        kv: key/value group scores [num_layers, num_key_value_heads].
        loadable_kv: group counts stock transformers can load (`UnitScores.loadable_kv_counts`).
        ranking: where units compete in `select_kept`: "layer" or "global".
        units: the unit kinds pruned ("mlp", "heads"); the other kind keeps every unit.
    """

    mlp: torch.Tensor
    kv: torch.Tensor
    loadable_kv: tuple[int, ...]
    ranking: str = "layer"
    units: tuple[str, ...] = ("mlp", "heads")

    @classmethod
    def from_scores(
        cls, scores: UnitScores, ranking: str = "layer", units: tuple[str, ...] = ("mlp", "heads")
    ) -> UnitOrder:
        """The ordering of `scores` (of the UNPRUNED model), each layer normalized to mean 1.

        Raises:
            ValueError: layers of different widths, or non-finite / negative scores.
        """
        rows = []
        for what, per_layer in (("mlp", scores.mlp), ("kv", scores.kv_groups)):
            if len({t.numel() for t in per_layer}) != 1:
                raise ValueError(f"{what} scores differ in width across layers (a pruned model?)")
            stacked = torch.stack([t.detach().double().flatten().cpu() for t in per_layer])
            _check_scores(what, stacked)
            rows.append(_mean_one(stacked))
        return cls(rows[0], rows[1], tuple(scores.loadable_kv_counts), ranking, tuple(units))

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return self.mlp.shape[0]

    def kept(self, ratio: float) -> KeptIndices:
        """The sub-model at pruning ratio `ratio` (0 keeps everything); nested in `ratio`.

        Raises:
            PruneError: `ratio` outside [0, 1), or one that empties a layer.
        """
        scores = UnitScores(
            mlp=tuple(self.mlp.unbind(0)),
            kv_groups=tuple(self.kv.unbind(0)),
            loadable_kv_counts=self.loadable_kv,
        )
        return select_kept(scores, ratio, units=self.units, ranking=self.ranking)

    def update(self, reports: Sequence[Report]) -> int:
        """Average the clients' normalized scores into the ordering (see the module docstring).

        Args:
            reports: per client, (the kept units it held, its mlp scores flat, its kv scores
                flat, its weight). Flat: the scores of each layer's kept units in kept order,
                concatenated over layers (what `client_stats` returns).

        Returns:
            How many coordinates (mlp and kv together) got a new score, i.e. were held by at
            least one client.

        Raises:
            ValueError: a report does not fit the ordering (layer count, index range, flat
                length), has non-finite or negative scores, a layer whose scores are all
                zero, or a weight that is not finite and positive. Nothing changes then.
        """
        totals = {"mlp": torch.zeros_like(self.mlp), "kv": torch.zeros_like(self.kv)}
        weights = {"mlp": torch.zeros_like(self.mlp), "kv": torch.zeros_like(self.kv)}
        for c, (kept, mlp_flat, kv_flat, weight) in enumerate(reports):
            weight = _positive(f"report {c}", weight)
            _check_fits(kept, self.mlp.shape[1], self.kv.shape[1], self.num_layers)
            for what, per_layer, flat in (
                ("mlp", kept.mlp, mlp_flat),
                ("kv", kept.kv_groups, kv_flat),
            ):
                parts = _split(f"report {c} {what}", flat, per_layer)
                for i, (idx, part) in enumerate(zip(per_layer, parts, strict=True)):
                    cols = torch.tensor(idx, dtype=torch.long)
                    totals[what][i, cols] += weight * part / part.mean()
                    weights[what][i, cols] += weight
        changed = 0
        for what in ("mlp", "kv"):
            held = weights[what] > 0
            old = getattr(self, what)
            new = torch.where(held, totals[what] / weights[what].clamp_min(1e-300), old)
            setattr(self, what, _mean_one(new))
            changed += int(held.sum())
        return changed

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"mlp": [L, I], "kv": [L, G]} (clones), for a server checkpoint."""
        return {"mlp": self.mlp.clone(), "kv": self.kv.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore `state_dict` output; it must have this ordering's shapes.

        Raises:
            ValueError: a missing tensor, another shape, or non-finite / negative scores.
        """
        loaded = {}
        for what in ("mlp", "kv"):
            value = state.get(what)
            mine = getattr(self, what)
            if not isinstance(value, torch.Tensor) or value.shape != mine.shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
                raise ValueError(
                    f"unit order state {what!r} has shape {shape}, expected {tuple(mine.shape)}"
                )
            loaded[what] = value.detach().double().cpu().clone()
            _check_scores(what, loaded[what])
        self.mlp, self.kv = loaded["mlp"], loaded["kv"]


def schedule(rnd: int, rounds: int, target: float, ramp: float) -> float:
    """The pruning ratio of round `rnd` (0-based): a cubic ramp from 0 to `target`.

    `target * (1 - (1 - min(1, rnd / max(1, ramp * rounds)))**3)` (Zhu & Gupta 2017): fast
    early, flat near the target, reached at round `ramp * rounds` and held afterwards.

    Args:
        rnd: the round, from 0.
        rounds: the number of rounds.
        target: the final ratio, in [0, 1).
        ramp: the fraction of the rounds over which it ramps, in (0, 1].

    Raises:
        ValueError: a value outside those ranges.
    """
    if not (0.0 < ramp <= 1.0 and 0.0 <= target < 1.0 and rnd >= 0 and rounds >= 1):
        raise ValueError(
            f"schedule needs rnd >= 0, rounds >= 1, target in [0, 1), ramp in (0, 1]; got "
            f"rnd={rnd}, rounds={rounds}, target={target}, ramp={ramp}"
        )
    progress = min(1.0, rnd / max(1.0, ramp * rounds))
    return target * (1.0 - (1.0 - progress) ** 3)


def kept_params(kept: KeptIndices, config: Any) -> int:
    """Parameters of the model `prune(model, kept)` would give, from `config`'s numbers.

    Counts embeddings, every kept layer's norms and projections (with biases when
    `attention_bias` / `mlp_bias`), the final norm and `lm_head` (once when tied).

    Args:
        kept: the kept units (removed layers, if any, count nothing).
        config: the UNPRUNED model's config.
    """
    hidden, vocab = int(config.hidden_size), int(config.vocab_size)
    d = int(getattr(config, "head_dim", None) or hidden // config.num_attention_heads)
    r = int(config.num_attention_heads) // int(
        config.num_key_value_heads or config.num_attention_heads
    )
    attn_bias, mlp_bias = (
        bool(getattr(config, "attention_bias", False)),
        bool(getattr(config, "mlp_bias", False)),
    )
    tied = bool(getattr(config, "tie_word_embeddings", False))
    total = vocab * hidden * (1 if tied else 2) + hidden  # embeddings, lm_head, final norm
    for i in kept.kept_layers:
        q, kv, channels = (
            len(kept.kv_groups[i]) * r * d,
            len(kept.kv_groups[i]) * d,
            len(kept.mlp[i]),
        )
        total += 2 * hidden  # input and post-attention norms
        total += (q + 2 * kv) * hidden + q * hidden  # q, k, v, o
        total += (q + 2 * kv + hidden) if attn_bias else 0
        total += 3 * channels * hidden  # gate, up, down
        total += (2 * channels + hidden) if mlp_bias else 0
    return total


def index_map(
    kept: KeptIndices, config: Any, axes: Axes, state: Mapping[str, torch.Tensor], rank: int | None
) -> IndexMap:
    """The part of the global adapter tensors a client of sub-model `kept` at `rank` holds.

    A LoRA A [R, in] of a pruned projection keeps the input columns `lora_index_map` gives,
    a B [out, R] its output rows, and both the first `rank` rank components. Tensors of
    modules pruning does not touch (e.g. an `lm_head` LoRA) keep their full width.

    Args:
        kept: the sub-model's units (every layer kept; FedSpine never drops layers).
        config: the UNPRUNED model's config.
        axes: named axes of the global tensors (`edgetune.fed.shapes.lora_axes`).
        state: the global tensors, named as `Adapter.names`.
        rank: the client's LoRA rank prefix; None holds the global rank.

    Raises:
        ValueError: `kept` drops layers, or `rank` is below 1 or above the global rank.
        AdapterMismatchError: `kept` does not fit `config`.
    """
    if kept.layers is not None:
        raise ValueError("FedSpine sub-models keep every layer; got a KeptIndices with layers")
    projections = lora_index_map(kept, config)
    per_tensor: dict[str, dict[str, torch.Tensor]] = {}
    for name, named in axes.items():
        found = _PROJECTION.findall(name)
        if not found or found[-1] not in projections:
            continue
        in_idx, out_idx = projections[found[-1]]
        chosen = {}
        if "in" in named and in_idx is not None:
            chosen["in"] = torch.tensor(in_idx, dtype=torch.int64)
        if "out" in named and out_idx is not None:
            chosen["out"] = torch.tensor(out_idx, dtype=torch.int64)
        if chosen:
            per_tensor[name] = chosen
    ranks = {state[n].shape[a["rank"]] for n, a in axes.items() if "rank" in a}
    if rank is not None and (rank < 1 or any(rank > r for r in ranks)):
        raise ValueError(f"client rank {rank} must be in [1, {min(ranks, default=0)}]")
    prefix = {} if rank is None else {"rank": torch.arange(rank, dtype=torch.int64)}
    return IndexMap.keep(axes, state, prefix, per_tensor=per_tensor)


def pack_kept(kept: KeptIndices, order: UnitOrder) -> dict[str, torch.Tensor]:
    """`kept` as bit masks, 8 units per byte, LITTLE bit order (unit 8b + j is bit j of byte b).

    Returns:
        {"spine.mlp_kept": uint8 [L, ceil(I/8)], "spine.kv_kept": uint8 [L, ceil(G/8)],
        "spine.kept_shape": int32 [L, I, G]}.

    Raises:
        ValueError: `kept` drops layers or does not fit `order`.
    """
    num_layers, width, groups = order.num_layers, order.mlp.shape[1], order.kv.shape[1]
    _check_fits(kept, width, groups, num_layers)
    return {
        MLP_KEPT: _pack_bits(_mask(kept.mlp, width)),
        KV_KEPT: _pack_bits(_mask(kept.kv_groups, groups)),
        KEPT_SHAPE: torch.tensor([num_layers, width, groups], dtype=torch.int32),
    }


def unpack_kept(tensors: Mapping[str, torch.Tensor]) -> KeptIndices:
    """The `KeptIndices` of `pack_kept` output, from a peer that may be wrong or hostile.

    Raises:
        ValueError: a missing tensor, a wrong dtype or shape, set padding bits, or a layer
            with no unit.
    """
    shape = tensors.get(KEPT_SHAPE)
    if not isinstance(shape, torch.Tensor) or shape.dtype != torch.int32 or shape.shape != (3,):
        raise ValueError(f"{KEPT_SHAPE} must be an int32 tensor [3] (layers, channels, groups)")
    num_layers, width, groups = (int(v) for v in shape)
    if min(num_layers, width, groups) < 1:
        raise ValueError(f"{KEPT_SHAPE} {[num_layers, width, groups]} must be positive")
    per_kind = []
    for name, n in ((MLP_KEPT, width), (KV_KEPT, groups)):
        packed = tensors.get(name)
        expected = (num_layers, (n + 7) // 8)
        if (
            not isinstance(packed, torch.Tensor)
            or packed.dtype != torch.uint8
            or packed.shape != expected
        ):
            raise ValueError(f"{name} must be a uint8 tensor of shape {expected}")
        bits = _unpack_bits(packed)
        if bits[:, n:].any():
            raise ValueError(f"{name} has bits set beyond the {n} units of a layer")
        rows = []
        for i in range(num_layers):
            idx = tuple(bits[i, :n].nonzero().flatten().tolist())
            if not idx:
                raise ValueError(f"{name}: layer {i} keeps no unit")
            rows.append(idx)
        per_kind.append(tuple(rows))
    return KeptIndices(mlp=per_kind[0], kv_groups=per_kind[1])


def _check_scores(what: str, scores: torch.Tensor) -> None:
    """Raise `ValueError` unless every score is finite and non-negative."""
    if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
        raise ValueError(f"{what} scores must be finite and non-negative")


def _positive(what: str, weight: Any) -> float:
    """`weight` as a float; raises `ValueError` unless it is a finite number above 0."""
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what}: weight must be finite and > 0, got {str(weight)[:40]}")
    return value


def _mean_one(rows: torch.Tensor) -> torch.Tensor:
    """Each row divided by its mean (an all-zero row stays zero)."""
    return rows / rows.mean(dim=1, keepdim=True).clamp_min(1e-300)


def _check_fits(kept: KeptIndices, width: int, groups: int, num_layers: int) -> None:
    """Raise `ValueError` unless `kept` keeps every one of `num_layers` layers within widths."""
    if kept.layers is not None or kept.num_layers != num_layers:
        raise ValueError(
            f"kept units describe {kept.num_layers} layers (dropped: {kept.layers is not None}); "
            f"FedSpine needs all {num_layers}"
        )
    for what, per_layer, n in (("mlp", kept.mlp, width), ("kv", kept.kv_groups, groups)):
        top = max(idx[-1] for idx in per_layer)
        if top >= n:
            raise ValueError(f"kept {what} index {top} is beyond the {n} units of a layer")


def _split(
    what: str, flat: torch.Tensor, per_layer: tuple[tuple[int, ...], ...]
) -> list[torch.Tensor]:
    """`flat` cut into one float64 chunk per layer of the kept counts, validated."""
    counts = [len(idx) for idx in per_layer]
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1 or not flat.is_floating_point():
        raise ValueError(f"{what}: scores must be a 1-D float tensor")
    if flat.numel() != sum(counts):
        raise ValueError(f"{what}: {flat.numel()} scores for {sum(counts)} kept units")
    values = flat.detach().double().cpu()
    _check_scores(what, values)
    parts = list(values.split(counts))
    for i, part in enumerate(parts):
        if not bool(part.sum() > 0):
            raise ValueError(f"{what}: layer {i} scores are all zero (no ordering to learn)")
    return parts


def _mask(per_layer: tuple[tuple[int, ...], ...], n: int) -> torch.Tensor:
    """Boolean [L, n] with the kept units set."""
    mask = torch.zeros(len(per_layer), n, dtype=torch.bool)
    for i, idx in enumerate(per_layer):
        mask[i, torch.tensor(idx, dtype=torch.long)] = True
    return mask


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[L, n] bool -> [L, ceil(n/8)] uint8, little bit order."""
    rows, n = mask.shape
    padded = torch.zeros(rows, (n + 7) // 8 * 8, dtype=torch.uint8)
    padded[:, :n] = mask.to(torch.uint8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    return (padded.view(rows, -1, 8) * weights).sum(dim=2, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """[L, B] uint8 -> [L, 8B] bool, little bit order."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & 1).bool().view(packed.shape[0], -1)
