"""FLAP-style bias compensation: removed units leave their mean contribution behind as a bias.

An An et al. 2024 ("Fluctuation-based Adaptive Structured Pruning", FLAP) observation: a
pruned unit's output is not zero on average, so dropping it shifts the layer's mean output.
With `x` the input of `down_proj` (the MLP channels, [I]) or of `o_proj` (the query heads'
attention outputs, [Hq*d]), `W` that projection's weight ([hidden, I] or [hidden, Hq*d]) and
`R` the removed input features, the pruned projection gets the bias

    b = W[:, R] @ mean(x[R])          (mean over the real calibration tokens)

so that `W[:, kept] @ mean(x[kept]) + b == W @ mean(x)`: the layer's mean output on the
calibration batches is exactly the unpruned one's.

Saving: stock Llama has no bias on `down_proj` / `o_proj`; its only switches are
`config.mlp_bias` (bias on gate, up and down) and `config.attention_bias` (on q, k, v, o). We
set the switch of each compensated block and give the other projections zero biases, so the
pruned model stays a stock Llama (stock `from_pretrained` loads it, and the per-layer-width
loader builds the biases from the same switches). The cost is a few zero vectors
(SmolLM2-135M: under 0.1% more parameters).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from edgetune.compress.prune.units import (
    KeptIndices,
    PruneError,
    group_size,
    head_dim,
    llama_layers,
)


@torch.no_grad()
def input_means(
    model: Any, batches: Iterable[torch.Tensor | Mapping[str, Any]]
) -> list[dict[str, torch.Tensor]]:
    """Mean input of every layer's `down_proj` ("mlp") and `o_proj` ("attn") over real tokens.

    Args:
        model: a Llama-layout causal LM (unpruned, the one `compensate` will change).
        batches: calibration batches as for `activation_scores` (padding excluded).

    Returns:
        Per layer, `{"mlp": [I], "attn": [Hq*d]}` float64 means.
    """
    layers = llama_layers(model)
    sums = [
        {
            "mlp": torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64),
            "attn": torch.zeros(layer.self_attn.o_proj.in_features, dtype=torch.float64),
        }
        for layer in layers
    ]
    count = [0]
    mask_now: list[torch.Tensor | None] = [None]
    handles = []
    for layer, acc in zip(layers, sums, strict=True):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(_adder(acc, "mlp", mask_now)))
        handles.append(
            layer.self_attn.o_proj.register_forward_pre_hook(_adder(acc, "attn", mask_now))
        )
    try:
        for batch in batches:
            inputs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
            mask_now[0] = inputs.get("attention_mask")
            ids = inputs["input_ids"]
            count[0] += int(mask_now[0].sum()) if mask_now[0] is not None else ids.numel()
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    if count[0] == 0:
        raise PruneError("bias compensation got no calibration tokens; pass at least one batch.")
    return [{key: s / count[0] for key, s in acc.items()} for acc in sums]


def _adder(acc: dict[str, torch.Tensor], key: str, mask_now: list[torch.Tensor | None]) -> Any:
    """A forward pre-hook adding the input features of real tokens to `acc[key]`."""

    def hook(_module: Any, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        mask = mask_now[0]
        if mask is not None and mask.shape == x.shape[:-1]:
            x = x[mask.to(torch.bool)]
        acc[key] += x.reshape(-1, x.shape[-1]).double().sum(0).cpu()

    return hook


@torch.no_grad()
def compensate(model: Any, kept: KeptIndices, means: list[dict[str, torch.Tensor]]) -> None:
    """Give `down_proj` / `o_proj` the mean contribution of the units `kept` will remove.

    Call it on the UNPRUNED model, then `prune(model, kept)`: the biases sit on the output
    (hidden) side, which pruning never slices. Blocks that lose nothing are left alone.

    Args:
        model: the unpruned Llama-layout causal LM (changed in place).
        kept: the units that will survive.
        means: `input_means(model, batches)` of this model.
    """
    layers = llama_layers(model)
    r, d = group_size(layers[0]), head_dim(layers[0])
    shifts: dict[str, list[torch.Tensor | None]] = {"mlp": [], "attn": []}
    for i, layer in enumerate(layers):
        alive = i in kept.kept_layers
        channels = _removed(layer.mlp.down_proj.in_features, kept.mlp[i]) if alive else []
        q_dims = [h * d + j for h in kept.query_heads(i, r) for j in range(d)] if alive else []
        heads = _removed(layer.self_attn.o_proj.in_features, q_dims) if alive else []
        shifts["mlp"].append(_shift(layer.mlp.down_proj, channels, means[i]["mlp"]))
        shifts["attn"].append(_shift(layer.self_attn.o_proj, heads, means[i]["attn"]))
    blocks = {
        "mlp": ("gate_proj", "up_proj", "down_proj"),
        "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    }
    flags = {"mlp": "mlp_bias", "attn": "attention_bias"}
    for block, per_layer in shifts.items():
        if all(s is None for s in per_layer):
            continue
        setattr(model.config, flags[block], True)
        for layer, shift in zip(layers, per_layer, strict=True):
            parent = layer.mlp if block == "mlp" else layer.self_attn
            for name in blocks[block]:
                _ensure_bias(getattr(parent, name))
            if shift is not None:
                parent.get_submodule(blocks[block][-1]).bias.add_(shift)


def _removed(n: int, kept: Iterable[int]) -> list[int]:
    """The indices below `n` not in `kept`."""
    keep = set(kept)
    return [j for j in range(n) if j not in keep]


def _shift(proj: nn.Linear, removed: list[int], mean: torch.Tensor) -> torch.Tensor | None:
    """`W[:, removed] @ mean[removed]`, or None when nothing is removed."""
    if not removed:
        return None
    idx = torch.tensor(removed, dtype=torch.long)
    w = proj.weight.detach().double().index_select(1, idx.to(proj.weight.device))
    return (w @ mean[idx].to(w.device)).to(proj.weight.dtype)


def _ensure_bias(proj: nn.Linear) -> None:
    """Give `proj` a zero bias if it has none."""
    if proj.bias is None:
        proj.bias = nn.Parameter(
            torch.zeros(proj.out_features, dtype=proj.weight.dtype, device=proj.weight.device)
        )
