"""Physical structured pruning: slice the kept rows/columns out of every projection.

`prune(model, kept)` replaces each pruned `nn.Linear` by a smaller one holding only the kept
rows (outputs) or columns (inputs), then rewrites the config to the new widths:

- MLP channels `C` of a layer: `gate_proj.weight[C, :]`, `up_proj.weight[C, :]`,
  `down_proj.weight[:, C]` -> `config.intermediate_size = |C|`;
- key/value groups `G`: `k_proj` / `v_proj` rows of heads `G`, `q_proj` rows of their query
  heads `Q = {g*r + h}`, `o_proj` columns of `Q` -> `config.num_key_value_heads = |G|`,
  `config.num_attention_heads = |Q|`; `head_dim` is written explicitly because
  `hidden_size / num_attention_heads` no longer gives it.

The widths must be the same in every layer (what `select_kept` produces): then
`save_pretrained` plus stock `AutoModelForCausalLM.from_pretrained` rebuild the same model.
The kept query-head count must also divide `hidden_size`, which
transformers' `LlamaConfig` checks at load time even with an explicit `head_dim`; a `KeptIndices`
that breaks it is refused rather than saved unloadable. Per-layer widths are not supported yet
(transformers 5's `per_layer_config` is a candidate design). Pruning happens in place (no second copy of the
weights, which matters on a small device); the model is returned for chaining.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgetune.compress.prune.units import (
    KeptIndices,
    PruneError,
    group_size,
    head_dim,
    llama_layers,
    loadable_kv_counts,
    num_kv_heads,
)


@torch.no_grad()
def prune(model: Any, kept: KeptIndices) -> Any:
    """Shrink `model` in place to the units in `kept` and update its config.

    Args:
        model: a Llama-layout causal LM.
        kept: the surviving MLP channels and key/value groups of every layer.

    Returns:
        The same model object, now with fewer parameters.

    Raises:
        PruneError: `kept` does not fit the model (layer count, index out of range) or its
            widths differ between layers.
    """
    layers = llama_layers(model)
    _check_fits(layers, kept)
    r, d = group_size(layers[0]), head_dim(layers[0])
    for i, layer in enumerate(layers):
        channels = torch.tensor(kept.mlp[i])
        mlp = layer.mlp
        mlp.gate_proj = _slice(mlp.gate_proj, rows=channels)
        mlp.up_proj = _slice(mlp.up_proj, rows=channels)
        mlp.down_proj = _slice(mlp.down_proj, cols=channels)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(channels)
        kv_rows = _head_rows(kept.kv_groups[i], d)
        q_rows = _head_rows(kept.query_heads(i, r), d)
        attn = layer.self_attn
        attn.q_proj = _slice(attn.q_proj, rows=q_rows)
        attn.k_proj = _slice(attn.k_proj, rows=kv_rows)
        attn.v_proj = _slice(attn.v_proj, rows=kv_rows)
        attn.o_proj = _slice(attn.o_proj, cols=q_rows)
    config = model.config
    config.intermediate_size = len(kept.mlp[0])
    config.num_key_value_heads = len(kept.kv_groups[0])
    config.num_attention_heads = len(kept.kv_groups[0]) * r
    config.head_dim = d
    return model


def _check_fits(layers: list[Any], kept: KeptIndices) -> None:
    """Raise `PruneError` unless `kept` names existing units with one width for all layers."""
    if kept.num_layers != len(layers):
        raise PruneError(
            f"KeptIndices describes {kept.num_layers} layers but the model has {len(layers)}; "
            "compute the indices on this model."
        )
    for i, layer in enumerate(layers):
        limits = [
            ("mlp", kept.mlp[i], int(layer.mlp.down_proj.in_features)),
            ("kv_groups", kept.kv_groups[i], num_kv_heads(layer)),
        ]
        for name, idx, n in limits:
            if idx[-1] >= n:
                raise PruneError(
                    f"layer {i} {name} index {idx[-1]} is out of range (the layer has {n}); "
                    "compute the indices on this model."
                )
    loadable = loadable_kv_counts(layers[0])
    if len(kept.kv_groups[0]) not in loadable:
        raise PruneError(
            f"keeping {len(kept.kv_groups[0])} key/value groups gives "
            f"{len(kept.kv_groups[0]) * group_size(layers[0])} query heads, which do not divide "
            f"hidden_size {layers[0].self_attn.q_proj.in_features}, so transformers could not load "
            f"the saved model; keep one of {list(loadable)} groups (select_kept() does)."
        )
    widths = {(len(m), len(g)) for m, g in zip(kept.mlp, kept.kv_groups, strict=True)}
    if len(widths) > 1:
        raise PruneError(
            f"kept widths differ between layers {sorted(widths)}; per-layer widths are not "
            "supported yet, use select_kept() with one global ratio."
        )


def _head_rows(heads: tuple[int, ...], d: int) -> torch.Tensor:
    """Row indices `h*d .. h*d+d-1` of each head in `heads`."""
    return torch.tensor([h * d + j for h in heads for j in range(d)], dtype=torch.long)


def _slice(
    linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> nn.Linear:
    """A new `nn.Linear` holding `linear`'s selected output rows and/or input columns."""
    weight: torch.Tensor = linear.weight
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    bias: torch.Tensor | None = linear.bias
    if bias is not None and rows is not None:
        bias = bias.index_select(0, rows.to(bias.device))
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        out.bias = nn.Parameter(bias.clone(), requires_grad=linear.bias.requires_grad)
    return out
