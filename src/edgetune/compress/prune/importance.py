"""Importance scores for the prunable units (MLP channels, key/value groups).

A unit's score is the sum over all its weights of `|W_ij| * s_j`, where `j` is the weight's
input feature and `s_j` a per-input-feature scale:

- magnitude (the baseline): `s_j = 1`, i.e. the L1 norm of the unit's weights;
- activation-aware (Wanda-sp, An et al. 2024 "Fluctuation-based Adaptive Structured Pruning",
  and Sun et al. 2023 "Wanda"): `s_j = ||X_j||_2`, the L2 norm of input feature `j` over all
  calibration tokens. The norms come from forward pre-hooks on `q_proj` (its input is also
  `k_proj`'s and `v_proj`'s), `gate_proj` (also `up_proj`'s), `down_proj` and `o_proj`, so
  only forward passes run: a device that can only do inference can compute them.

Unit weights, with `d = head_dim`, `r` query heads per group, `H = hidden`, `I = intermediate`:
MLP channel `c`: `gate[c, :]`, `up[c, :]` (inputs: hidden, [H]) and `down[:, c]` (input:
channel `c` itself). KV group `g`: `q[g*r*d:(g+1)*r*d, :]`, `k[g*d:(g+1)*d, :]`,
`v[g*d:(g+1)*d, :]` (inputs: hidden) and `o[:, g*r*d:(g+1)*r*d]` (inputs: those heads'
attention outputs). Padding tokens (attention_mask == 0) are left out of the norms.

- first-order Taylor (LLM-Pruner, Ma et al. 2023): the per-weight saliency is
  `|W_ij * dL/dW_ij|` instead of `|W_ij| * s_j`, with `dL/dW` the gradient of the causal-LM
  loss summed over the calibration batches. It needs backprop; `torch.autograd.grad` on the
  projection weights only, so no `.grad` is left behind and frozen weights stay frozen.

All three share the unit bookkeeping (`_scores`): each supplies a per-weight saliency.

Whole decoder layers get one score each (`UnitScores.layers`):
- activation: block influence (ShortGPT, Men et al. 2024), `1 - cos(x_in, x_out)` of the
  layer's input and output hidden states, averaged over real calibration tokens, from the
  same forward passes (a layer that barely turns the residual stream matters little);
- taylor and magnitude: the sum of the layer's unit scores (all its MLP channels and
  key/value groups), i.e. the layer's total first-order saliency, or for magnitude the L1
  norm of its seven projections (a weak, data-free baseline: it ignores the residual stream).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from edgetune.compress.prune.units import (
    PruneError,
    group_size,
    head_dim,
    llama_layers,
    loadable_kv_counts,
    num_kv_heads,
)


@dataclass(frozen=True)
class UnitScores:
    """Per-layer importance of every unit; higher means more important.

    Attributes:
        mlp: one tensor [intermediate_size] per layer.
        kv_groups: one tensor [num_key_value_heads] per layer.
    """

    mlp: tuple[torch.Tensor, ...]
    kv_groups: tuple[torch.Tensor, ...]
    loadable_kv_counts: tuple[int, ...]
    """How many groups a layer may keep and still load in stock transformers."""
    layers: torch.Tensor | None = None
    """One score per decoder layer [num_layers]; None = the sum of the layer's unit scores."""

    def layer_scores(self) -> torch.Tensor:
        """Per-layer importance: `layers`, or each layer's summed unit scores."""
        if self.layers is not None:
            return self.layers
        return torch.stack(
            [m.sum() + g.sum() for m, g in zip(self.mlp, self.kv_groups, strict=True)]
        )


@torch.no_grad()
def magnitude_scores(model: Any) -> UnitScores:
    """L1 norm of each unit's weights."""
    layers = llama_layers(model)
    return _scores(layers, [_Scales() for _ in layers])


@torch.no_grad()
def activation_scores(
    model: Any, batches: Iterable[torch.Tensor | Mapping[str, Any]]
) -> UnitScores:
    """Weight magnitude times input-activation norm, from forward passes on `batches`.

    Args:
        model: a Llama-layout causal LM (left in its current train/eval mode).
        batches: calibration batches, each `input_ids` [B, T] or a mapping with `input_ids`
            and optionally `attention_mask` (padding is excluded from the norms).

    Returns:
        The scores of every MLP channel and key/value group, per layer.
    """
    layers = llama_layers(model)
    scales = [_Scales.zeros(layer) for layer in layers]
    mask_now: list[torch.Tensor | None] = [None]
    handles = []
    for layer, sc in zip(layers, scales, strict=True):
        for module, key in (
            (layer.self_attn.q_proj, "hidden_attn"),
            (layer.self_attn.o_proj, "attn_out"),
            (layer.mlp.gate_proj, "hidden_mlp"),
            (layer.mlp.down_proj, "channels"),
        ):
            handles.append(module.register_forward_pre_hook(_accumulator(sc, key, mask_now)))
    influence = _BlockInfluence(layers, mask_now)
    handles += influence.handles
    seen = 0
    try:
        for batch in batches:
            inputs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
            mask_now[0] = inputs.get("attention_mask")
            model(**inputs)
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise PruneError("activation importance got no calibration batches; pass at least one.")
    for sc in scales:
        sc.finish()
    return dataclasses.replace(_scores(layers, scales), layers=influence.scores())


class _BlockInfluence:
    """Hooks accumulating `1 - cos(input, output)` of every decoder layer over real tokens."""

    def __init__(self, layers: list[Any], mask_now: list[torch.Tensor | None]) -> None:
        self.mask_now = mask_now
        self.total = torch.zeros(len(layers), dtype=torch.float64)
        self.tokens = torch.zeros(len(layers), dtype=torch.float64)
        self.inputs: list[torch.Tensor | None] = [None] * len(layers)
        self.handles = []
        for i, layer in enumerate(layers):
            hook = self._save_input(i)
            self.handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._add(i)))

    def _save_input(self, i: int) -> Any:
        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.inputs[i] = hidden.detach()

        return hook

    def _add(self, i: int) -> Any:
        def hook(_module: Any, _args: tuple[Any, ...], output: Any) -> None:
            out = (output[0] if isinstance(output, tuple) else output).detach()
            x_in = self.inputs[i]
            assert x_in is not None
            cos = torch.nn.functional.cosine_similarity(x_in.float(), out.float(), dim=-1)
            mask = self.mask_now[0]
            if mask is not None and mask.shape == cos.shape:
                cos = cos[mask.to(torch.bool)]
            self.total[i] += (1.0 - cos).double().sum().cpu()
            self.tokens[i] += cos.numel()
            self.inputs[i] = None

        return hook

    def scores(self) -> torch.Tensor:
        """Mean block influence per layer."""
        return (self.total / self.tokens.clamp(min=1)).float()


@torch.enable_grad()
def taylor_scores(model: Any, batches: Iterable[torch.Tensor | Mapping[str, Any]]) -> UnitScores:
    """First-order Taylor importance `sum |W * dL/dW|` per unit, from the LM loss on `batches`.

    Args:
        model: a Llama-layout causal LM (left in its current train/eval mode).
        batches: calibration batches as for `activation_scores`; the labels are the inputs
            (next-token loss), padding positions (attention_mask == 0) excluded.

    Returns:
        The scores of every MLP channel and key/value group, per layer.
    """
    layers = llama_layers(model)
    weights = [proj.weight for layer in layers for proj in _projections(layer)]
    frozen = [not w.requires_grad for w in weights]
    grads = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    seen = 0
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in batches:
            inputs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
            labels = inputs["input_ids"].clone()
            if inputs.get("attention_mask") is not None:
                labels[inputs["attention_mask"] == 0] = -100
            loss = model(**inputs, labels=labels).loss
            for total, g in zip(grads, torch.autograd.grad(loss, weights), strict=True):
                total += g.float()
            seen += 1
    finally:
        for w, was_frozen in zip(weights, frozen, strict=True):
            w.requires_grad_(not was_frozen)
    if seen == 0:
        raise PruneError("Taylor importance got no calibration batches; pass at least one.")
    taylor = _Taylor({id(w): g for w, g in zip(weights, grads, strict=True)})
    with torch.no_grad():
        return _scores(layers, [taylor] * len(layers))


def _projections(layer: Any) -> tuple[Any, ...]:
    """The seven prunable projections of a decoder layer."""
    attn, mlp = layer.self_attn, layer.mlp
    return (
        attn.q_proj,
        attn.k_proj,
        attn.v_proj,
        attn.o_proj,
        mlp.gate_proj,
        mlp.up_proj,
        mlp.down_proj,
    )


class _Saliency(Protocol):
    """Per-weight, non-negative saliency of a projection weight (`key` names its input space)."""

    def weighted(self, weight: torch.Tensor, key: str) -> torch.Tensor: ...


class _Taylor:
    """`|W * dL/dW|`, with the accumulated gradients looked up by weight identity."""

    def __init__(self, grads: dict[int, torch.Tensor]) -> None:
        self.grads = grads

    def weighted(self, weight: torch.Tensor, key: str) -> torch.Tensor:
        """The element-wise first-order saliency of `weight` (`key` is unused)."""
        del key
        return (weight.detach().float() * self.grads[id(weight)]).abs()


class _Scales:
    """Per-input-feature scales `s_j` for the four input spaces of one layer (None = all ones)."""

    def __init__(self, sums: dict[str, torch.Tensor] | None = None) -> None:
        self.sums = sums
        self.norms: dict[str, torch.Tensor | None] = dict.fromkeys(
            ("hidden_attn", "attn_out", "hidden_mlp", "channels")
        )

    @classmethod
    def zeros(cls, layer: Any) -> _Scales:
        """Empty sums of squares sized for `layer`'s four input spaces."""
        attn, mlp = layer.self_attn, layer.mlp
        sizes = {
            "hidden_attn": attn.q_proj.in_features,
            "attn_out": attn.o_proj.in_features,
            "hidden_mlp": mlp.gate_proj.in_features,
            "channels": mlp.down_proj.in_features,
        }
        return cls({key: torch.zeros(n, dtype=torch.float64) for key, n in sizes.items()})

    def finish(self) -> None:
        """Turn the sums of squares into L2 norms."""
        assert self.sums is not None
        self.norms = {key: s.sqrt().float() for key, s in self.sums.items()}

    def weighted(self, weight: torch.Tensor, key: str) -> torch.Tensor:
        """`|W|` with each input column scaled by its feature's norm."""
        norm = self.norms[key]
        absw = weight.detach().abs().float()
        return absw if norm is None else absw * norm.to(absw.device)


def _accumulator(scales: _Scales, key: str, mask_now: list[torch.Tensor | None]) -> Any:
    """A forward pre-hook adding the squared input features of real tokens to `scales`."""

    def hook(_module: Any, args: tuple[Any, ...]) -> None:
        x = args[0].detach().float()
        mask = mask_now[0]
        if mask is not None and mask.shape == x.shape[:-1]:
            x = x[mask.to(torch.bool)]
        assert scales.sums is not None
        scales.sums[key] += x.reshape(-1, x.shape[-1]).pow(2).sum(0).double().cpu()

    return hook


def _scores(layers: list[Any], scales: Sequence[_Saliency]) -> UnitScores:
    """Sum the per-weight saliencies of every unit of every layer."""
    mlp, kv = [], []
    for layer, sc in zip(layers, scales, strict=True):
        m = layer.mlp
        mlp.append(
            sc.weighted(m.gate_proj.weight, "hidden_mlp").sum(1)
            + sc.weighted(m.up_proj.weight, "hidden_mlp").sum(1)
            + sc.weighted(m.down_proj.weight, "channels").sum(0)
        )
        kv.append(_group_scores(layer, sc))
    loadable = loadable_kv_counts(layers[0])
    return UnitScores(mlp=tuple(mlp), kv_groups=tuple(kv), loadable_kv_counts=loadable)


def _group_scores(layer: Any, sc: _Saliency) -> torch.Tensor:
    """One score per key/value group: its q/k/v rows plus its query heads' o_proj columns."""
    attn, groups = layer.self_attn, num_kv_heads(layer)
    per_group_q = group_size(layer) * head_dim(layer)
    q = sc.weighted(attn.q_proj.weight, "hidden_attn").reshape(groups, per_group_q, -1)
    k = sc.weighted(attn.k_proj.weight, "hidden_attn").reshape(groups, head_dim(layer), -1)
    v = sc.weighted(attn.v_proj.weight, "hidden_attn").reshape(groups, head_dim(layer), -1)
    o = sc.weighted(attn.o_proj.weight, "attn_out")
    o = o.reshape(o.shape[0], groups, per_group_q)
    return q.sum((1, 2)) + k.sum((1, 2)) + v.sum((1, 2)) + o.sum((0, 2))
