"""Which part of each global adapter tensor a federated client holds: per-tensor index maps.

Clients of one federation may train different shapes of the global adapter: a rank
prefix (HetLoRA, `edgetune.fed.hetlora`), or the input/output channels a pruned model
kept (FedSpine). An `IndexMap` says, for each adapter tensor and each mapped axis, which
global indices the client holds, as a sorted, unique int64 tensor; unmapped axes and
tensors are held whole. The client's tensor is the global one indexed on every mapped
axis, so a tensor [out, r] with out-map o (k_o indices) and rank-map p (k_p) is
[k_o, k_p] on the client.

Axes are named from the module structure, never guessed from parameter names
(`lora_axes`): a PEFT LoRA layer's A [r, in] has axes {"rank": 0, "in": 1} and its
B [out, r] {"out": 0, "rank": 1}.

Aggregation (`scatter_combine`) generalises HetLoRA's zero padding: every global
coordinate is combined over exactly the clients that hold it, with those clients'
weights, and is zero where no client holds it. Coordinates with the same holder set are
grouped and each group is one call of the aggregator, so per-coordinate rules (mean,
median, trimmed mean) give bit-for-bit the values `hetlora.aggregate_deltas` gives for
rank prefixes, and plain `combine` over whole tensors when every client holds everything.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from edgetune.fed.payloads import PayloadError
from edgetune.peft.multicopy import lora_layers

Axes = dict[str, dict[str, int]]
"""Tensor name -> axis name ("rank", "in", "out") -> dimension."""

Combine = Callable[[list[torch.Tensor], list[float]], torch.Tensor]

_JSON_VERSION = 1


def lora_axes(adapter: Any) -> Axes:
    """The named axes of each trainable tensor of an edgetune `Adapter`.

    LoRA tensors are found by identity among the PEFT LoRA layers' parameters (so LoRA
    and LoRA-FA, whose A is frozen, both work); any other trainable tensor maps to {}
    (held whole).

    Args:
        adapter: an `edgetune.peft.Adapter` (`.model`, `.names`, `.trainable()`).

    Returns:
        For every name in `adapter.names`, its axis name -> dimension.
    """
    known: dict[int, dict[str, int]] = {}
    layer: Any
    for layer in lora_layers(adapter.model):
        known[id(layer.lora_A["default"].weight)] = {"rank": 0, "in": 1}
        known[id(layer.lora_B["default"].weight)] = {"out": 0, "rank": 1}
    return {
        name: dict(known.get(id(p), {}))
        for name, p in zip(adapter.names, adapter.trainable(), strict=True)
    }


@dataclass(frozen=True, eq=False)
class IndexMap:
    """For each tensor name and mapped axis, the global indices a client holds.

    Attributes:
        kept: tensor name -> {axis: sorted unique int64 indices}. Tensors and axes not
            listed are held whole. Treat as read-only.
    """

    kept: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, axes in self.kept.items():
            for axis, idx in axes.items():
                _check_indices(name, axis, idx)

    @classmethod
    def full(cls) -> IndexMap:
        """Every tensor held whole."""
        return cls({})

    @classmethod
    def rank_prefix(
        cls, axes: Axes, state: Mapping[str, torch.Tensor], rank: int | None
    ) -> IndexMap:
        """The first `rank` components of every tensor with a "rank" axis.

        Args:
            axes: named axes per tensor (`lora_axes`).
            state: the global tensors (for the sizes).
            rank: the client's rank; None, or at least a tensor's rank, holds it whole.

        Raises:
            ValueError: `rank` is below 1.
        """
        if rank is None:
            return cls.full()
        if rank < 1:
            raise ValueError(f"a client rank must be >= 1, got {rank}")
        return cls.keep(axes, state, {"rank": torch.arange(rank)}, clip=True)

    @classmethod
    def keep(
        cls,
        axes: Axes,
        state: Mapping[str, torch.Tensor],
        kept: Mapping[str, torch.Tensor],
        per_tensor: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        clip: bool = False,
    ) -> IndexMap:
        """Kept indices per named axis, e.g. {"rank": idx_r, "in": idx_in}.

        Args:
            axes: named axes per tensor (`lora_axes`).
            state: the global tensors (for the sizes).
            kept: axis name -> indices, applied to every tensor that has that axis.
            per_tensor: tensor name -> axis name -> indices, overriding `kept` for that
                tensor (pruned models keep different channels per layer).
            clip: drop indices beyond an axis's size instead of raising (a rank prefix
                longer than a tensor's rank holds it whole).

        Returns:
            The map; an axis whose indices cover it entirely is left unmapped, so a map
            that keeps everything equals `IndexMap.full()`.

        Raises:
            ValueError: indices that are not sorted, unique and within the axis, or a
                `per_tensor` entry naming an unknown tensor or axis.
        """
        unknown = sorted(set(per_tensor or {}) - set(axes))
        if unknown:
            raise ValueError(f"per_tensor names tensors without axes: {unknown[:3]}")
        out: dict[str, dict[int, torch.Tensor]] = {}
        for name, named in axes.items():
            chosen = {
                **{a: kept[a] for a in named if a in kept},
                **(per_tensor or {}).get(name, {}),
            }
            for axis_name, idx in chosen.items():
                if axis_name not in named:
                    raise ValueError(f"{name} has no axis {axis_name!r} (it has {sorted(named)})")
                dim, size = named[axis_name], state[name].shape[named[axis_name]]
                idx = torch.as_tensor(idx, dtype=torch.int64)
                if clip:
                    idx = idx[idx < size]
                _check_indices(name, dim, idx, size)
                if not torch.equal(idx, torch.arange(size)):
                    out.setdefault(name, {})[dim] = idx
        return cls(out)

    def shapes(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
        """The shape a client holding this map has for each tensor of `state`."""
        out = {}
        for name, t in state.items():
            shape = list(t.shape)
            for axis, idx in self.kept.get(name, {}).items():
                shape[axis] = len(idx)
            out[name] = torch.Size(shape)
        return out

    def problem(self, reference: Mapping[str, torch.Tensor]) -> str | None:
        """Why this map does not fit the global tensors `reference`, or None."""
        for name, axes in self.kept.items():
            if name not in reference:
                return f"index map names a tensor the adapter lacks: {name[:80]}"
            shape = reference[name].shape
            for axis, idx in axes.items():
                if axis >= len(shape):
                    return f"{name}: index map axis {axis}, but the tensor has {len(shape)}"
                if len(idx) and int(idx[-1]) >= shape[axis]:
                    return f"{name}: index {int(idx[-1])} on axis {axis} of size {shape[axis]}"
        return None

    def describe(self) -> dict[str, Any]:
        """A small summary for logs: mapped tensors and the distinct kept counts per axis."""
        sizes: dict[str, set[int]] = {}
        for axes in self.kept.values():
            for axis, idx in axes.items():
                sizes.setdefault(str(axis), set()).add(len(idx))
        return {"mapped": len(self.kept), "kept": {a: sorted(s) for a, s in sorted(sizes.items())}}

    def to_json(self) -> str:
        """The map as JSON (plain lists of indices; axes as string keys)."""
        tensors = {
            name: {str(axis): idx.tolist() for axis, idx in sorted(axes.items())}
            for name, axes in sorted(self.kept.items())
        }
        return json.dumps({"version": _JSON_VERSION, "tensors": tensors}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, reference: Mapping[str, torch.Tensor] | None = None) -> IndexMap:
        """Read `to_json` output, from a peer that may be wrong or hostile.

        Args:
            text: the JSON text.
            reference: the global tensors; when given, the map must fit them.

        Raises:
            PayloadError: the text is not a valid index map (the message names what).
        """
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise PayloadError(f"index map is not JSON: {str(exc)[:80]}") from None
        if not isinstance(data, dict) or data.get("version") != _JSON_VERSION:
            raise PayloadError(f"index map must be an object with version {_JSON_VERSION}")
        tensors = data.get("tensors")
        if not isinstance(tensors, dict):
            raise PayloadError("index map: tensors must be an object of name -> {axis: [...]}")
        kept: dict[str, dict[int, torch.Tensor]] = {}
        for name, axes in tensors.items():
            if not isinstance(axes, dict):
                raise PayloadError(f"index map: {name[:80]} must map axes to index lists")
            kept[name] = {_json_axis(name, a): _json_indices(name, v) for a, v in axes.items()}
        try:
            imap = cls(kept)
        except ValueError as exc:
            raise PayloadError(f"index map: {exc}") from None
        if reference is not None and (reason := imap.problem(reference)) is not None:
            raise PayloadError(reason)
        return imap

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IndexMap):
            return NotImplemented
        if self.kept.keys() != other.kept.keys():
            return False
        return all(
            a.keys() == (b := other.kept[n]).keys() and all(torch.equal(a[k], b[k]) for k in a)
            for n, a in self.kept.items()
        )

    __hash__ = None  # type: ignore[assignment]


def gather(state: Mapping[str, torch.Tensor], imap: IndexMap) -> dict[str, torch.Tensor]:
    """The client's part of `state` (cloned): each tensor indexed on its mapped axes.

    Raises:
        ValueError: the map does not fit `state`.
    """
    _require_fit(imap, state)
    out = {}
    for name, t in state.items():
        part = t
        for axis, idx in imap.kept.get(name, {}).items():
            part = part.index_select(axis, idx)
        out[name] = part.clone() if part is t else part
    return out


@torch.no_grad()
def scatter(
    into: dict[str, torch.Tensor], part: Mapping[str, torch.Tensor], imap: IndexMap
) -> None:
    """Write a client's part back into the global tensors `into`, in place.

    Raises:
        ValueError: `part` does not have the shapes the map plans.
    """
    reason = check_shapes(part, into, imap, names_must_match=False)
    if reason is not None:
        raise ValueError(reason)
    for name, value in part.items():
        into[name][_block(into[name].shape, imap.kept.get(name, {}))] = value


def scatter_combine(
    reference: Mapping[str, torch.Tensor],
    parts: list[tuple[Mapping[str, torch.Tensor], IndexMap]],
    weights: list[float],
    combine: Combine,
) -> dict[str, torch.Tensor]:
    """Combine clients' parts into `reference`'s shapes, coordinate by coordinate.

    Every global coordinate is `combine([v_c for holders c], [w_c for holders c])` over
    exactly the clients whose map holds it (in client order), and zero where none does.
    Coordinates with the same holder set are one call of `combine` (values flattened to
    1-D), so `combine` must act per coordinate; a tensor every client holds whole is one
    call on the whole tensors.

    Args:
        reference: the global tensors (names, shapes, dtypes of the result).
        parts: per client, its tensors and the map they were cut with.
        weights: per client.
        combine: an aggregation rule (`edgetune.fed.aggregate.combine` with a rule bound).

    Raises:
        ValueError: a part does not match its map, or lengths differ.
    """
    if len(parts) != len(weights) or not parts:
        raise ValueError(f"{len(parts)} parts and {len(weights)} weights (need as many, >= 1)")
    for c, (tensors, imap) in enumerate(parts):
        if (reason := check_shapes(tensors, reference, imap)) is not None:
            raise ValueError(f"client {c}: {reason}")
    out = {}
    for name, ref in reference.items():
        maps = [imap.kept.get(name, {}) for _, imap in parts]
        values = [tensors[name] for tensors, _ in parts]
        if not any(maps):
            out[name] = combine(values, list(weights)).to(ref.dtype)
        else:
            out[name] = _combine_tensor(ref, values, maps, weights, combine)
    return out


def check_shapes(
    update_tensors: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    imap: IndexMap,
    names_must_match: bool = True,
) -> str | None:
    """The reason an update's tensors do not match what `imap` plans of `reference`, or None.

    Args:
        update_tensors: the client's tensors.
        reference: the global tensors.
        imap: the client's map.
        names_must_match: require every tensor of `reference` (else a subset will do).
    """
    if (reason := imap.problem(reference)) is not None:
        return reason
    missing = sorted(set(reference) - set(update_tensors)) if names_must_match else []
    extra = sorted(set(update_tensors) - set(reference))
    if missing or extra:
        return f"tensor names differ (missing {missing[:2]}, unexpected {extra[:2]})"
    planned = imap.shapes(reference)
    for name, value in update_tensors.items():
        ref = reference[name]
        if value.shape != planned[name] or value.dtype != ref.dtype:
            return (
                f"{name}: got {tuple(value.shape)} {value.dtype}, expected "
                f"{tuple(planned[name])} {ref.dtype}"
            )
    return None


def _combine_tensor(
    ref: torch.Tensor,
    values: list[torch.Tensor],
    maps: list[dict[int, torch.Tensor]],
    weights: list[float],
    combine: Combine,
) -> torch.Tensor:
    """One tensor of `scatter_combine`: group coordinates by holder set, combine each."""
    held = torch.zeros((len(values), ref.numel()), dtype=torch.bool)
    placed = torch.zeros((len(values), ref.numel()), dtype=ref.dtype)
    for c, (value, axes) in enumerate(zip(values, maps, strict=True)):
        block = _block(ref.shape, axes)
        held[c].view(ref.shape)[block] = True
        placed[c].view(ref.shape)[block] = value
    group = _holder_groups(held)
    result = torch.zeros(ref.numel(), dtype=ref.dtype)
    for g in range(int(group.max()) + 1):
        coords = (group == g).nonzero().flatten()
        members = held[:, coords[0]].nonzero().flatten().tolist()
        if not members:
            continue  # no client holds these coordinates: zero
        result[coords] = combine(
            [placed[c, coords] for c in members], [weights[c] for c in members]
        )
    return result.view(ref.shape)


def _holder_groups(held: torch.Tensor) -> torch.Tensor:
    """Group ids 0..G-1 per coordinate of `held` [C, numel]: equal ids, equal holder sets.

    The holder bits are read into an integer key a client at a time and renumbered every
    32 clients, so keys stay below numel * 2**32 for any C (1-D `torch.unique` is ~20x
    faster than `unique(dim=1)` over the mask's columns).
    """
    key = torch.zeros(held.shape[1], dtype=torch.int64)
    for c in range(held.shape[0]):
        key = key * 2 + held[c]
        if c % 32 == 31:
            key = torch.unique(key, return_inverse=True)[1]
    return torch.unique(key, return_inverse=True)[1]


def _block(shape: torch.Size, axes: Mapping[int, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Broadcast index tensors selecting the sub-block `axes` keeps of a `shape` tensor."""
    index = []
    for dim, size in enumerate(shape):
        idx = axes.get(dim, torch.arange(size))
        view = [1] * len(shape)
        view[dim] = len(idx)
        index.append(idx.view(view))
    return tuple(index)


def _check_indices(name: str, axis: int, idx: Any, size: int | None = None) -> None:
    if not isinstance(axis, int) or axis < 0:
        raise ValueError(f"{name}: axis must be an int >= 0, got {axis!r}")
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 1:
        raise ValueError(f"{name}: axis {axis} indices must be a 1-D int64 tensor")
    if len(idx) and (int(idx[0]) < 0 or not bool((idx[1:] > idx[:-1]).all())):
        raise ValueError(f"{name}: axis {axis} indices must be sorted, unique and >= 0")
    if size is not None and len(idx) and int(idx[-1]) >= size:
        raise ValueError(f"{name}: index {int(idx[-1])} on axis {axis} of size {size}")


def _require_fit(imap: IndexMap, state: Mapping[str, torch.Tensor]) -> None:
    if (reason := imap.problem(state)) is not None:
        raise ValueError(reason)


def _json_axis(name: str, axis: Any) -> int:
    if not (isinstance(axis, str) and axis.isdigit() and len(axis) < 3):
        raise PayloadError(f"index map: {name[:80]}: axis {str(axis)[:20]!r} is not a small int")
    return int(axis)


def _json_indices(name: str, values: Any) -> torch.Tensor:
    ok = isinstance(values, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62 for v in values
    )
    if not ok:
        raise PayloadError(f"index map: {name[:80]}: indices must be a list of ints >= 0")
    return torch.tensor(values, dtype=torch.int64)
