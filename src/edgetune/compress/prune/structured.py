"""Physical structured pruning: slice the kept rows/columns out of every projection.

`prune(model, kept)` replaces each pruned `nn.Linear` by a smaller one holding only the kept
rows (outputs) or columns (inputs), drops removed decoder layers, then rewrites the config:

- MLP channels `C` of a layer: `gate_proj.weight[C, :]`, `up_proj.weight[C, :]`,
  `down_proj.weight[:, C]`;
- key/value groups `G`: `k_proj` / `v_proj` rows of heads `G`, `q_proj` rows of their query
  heads `Q = {g*r + h}`, `o_proj` columns of `Q`; `head_dim` is written explicitly because
  `hidden_size / num_attention_heads` no longer gives it;
- layers: the kept blocks stay in order and are renumbered (`self_attn.layer_idx`, the KV
  cache index), `num_hidden_layers` and `layer_types` follow. A removed layer is an identity
  on the residual stream.

Saved-model design. transformers' Llama has one width for every layer, so two formats:

- uniform widths whose query-head count divides `hidden_size` (what `select_kept` with one
  global ratio gives): the stock fields `intermediate_size`, `num_key_value_heads`,
  `num_attention_heads` hold them and stock `AutoModelForCausalLM.from_pretrained` loads the
  folder;
- any other widths (per-layer ratios, or a uniform head count transformers refuses): the
  stock fields keep the widths the layers were pruned FROM (>= every layer's width) and
  config.json gets `edgetune_layer_widths`, one `{"intermediate_size", "num_key_value_heads"}`
  per layer. Stock loading then fails loudly with a size-mismatch error (never a silent
  re-init, since at least one layer is narrower than the stock fields say), and
  `load_layer_widths(folder)` (called by `edgetune.models.load`) builds the stock model,
  prunes each layer to its recorded widths with the first-n indices and loads the weights
  strictly. The hidden-size rule does not apply per layer there: attention reshapes with
  `head_dim` and `num_key_value_groups` (unchanged), never with the layer's head count.

Pruning happens in place (no second copy of the weights, which matters on a small device);
the model is returned for chaining.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetune.compress.prune.units import (
    KeptIndices,
    PruneError,
    group_size,
    head_dim,
    llama_layers,
    num_kv_heads,
)

LAYER_WIDTHS = "edgetune_layer_widths"
"""The config.json key holding per-layer widths (see the module docstring)."""


@torch.no_grad()
def prune(model: Any, kept: KeptIndices) -> Any:
    """Shrink `model` in place to the units and layers in `kept` and update its config.

    Args:
        model: a Llama-layout causal LM.
        kept: the surviving MLP channels and key/value groups of every layer, and the
            surviving layers.

    Returns:
        The same model object, now with fewer parameters.

    Raises:
        PruneError: `kept` does not fit the model (layer count, index out of range).
    """
    layers = llama_layers(model)
    _check_fits(layers, kept)
    r, d = group_size(layers[0]), head_dim(layers[0])
    for i in kept.kept_layers:
        _shrink_layer(layers[i], kept.mlp[i], kept.query_heads(i, r), kept.kv_groups[i], d)
    if kept.layers is not None:
        _drop_layers(model, kept.layers)
    _write_widths(model.config, llama_layers(model), r, d)
    return model


def _shrink_layer(
    layer: Any, channels: tuple[int, ...], q_heads: tuple[int, ...], kv: tuple[int, ...], d: int
) -> None:
    """Slice one decoder layer to the kept MLP channels and query / key-value heads."""
    idx = torch.tensor(channels)
    mlp = layer.mlp
    mlp.gate_proj = _slice(mlp.gate_proj, rows=idx)
    mlp.up_proj = _slice(mlp.up_proj, rows=idx)
    mlp.down_proj = _slice(mlp.down_proj, cols=idx)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(channels)
    kv_rows, q_rows = _head_rows(kv, d), _head_rows(q_heads, d)
    attn = layer.self_attn
    attn.q_proj = _slice(attn.q_proj, rows=q_rows)
    attn.k_proj = _slice(attn.k_proj, rows=kv_rows)
    attn.v_proj = _slice(attn.v_proj, rows=kv_rows)
    attn.o_proj = _slice(attn.o_proj, cols=q_rows)


def _drop_layers(model: Any, keep: tuple[int, ...]) -> None:
    """Keep only decoder layers `keep`, renumbered 0..n-1 (the KV cache indexes by layer_idx)."""
    old = model.model.layers
    model.model.layers = nn.ModuleList([old[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
    config = model.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]


def _write_widths(config: Any, layers: list[Any], r: int, d: int) -> None:
    """Record the layers' widths: stock fields when uniform and loadable, else per layer."""
    widths = _widths_of(layers)
    config.head_dim = d
    uniform = all(w == widths[0] for w in widths)
    if uniform and config.hidden_size % (widths[0]["num_key_value_heads"] * r) == 0:
        config.intermediate_size = widths[0]["intermediate_size"]
        config.num_key_value_heads = widths[0]["num_key_value_heads"]
        config.num_attention_heads = widths[0]["num_key_value_heads"] * r
        if hasattr(config, LAYER_WIDTHS):
            delattr(config, LAYER_WIDTHS)
        return
    setattr(config, LAYER_WIDTHS, widths)


def layer_widths(model: Any) -> list[dict[str, int]]:
    """Per decoder layer of `model`: its `intermediate_size` and `num_key_value_heads`."""
    return _widths_of(llama_layers(model))


def _widths_of(layers: list[Any]) -> list[dict[str, int]]:
    return [
        {
            "intermediate_size": layer.mlp.down_proj.in_features,
            "num_key_value_heads": num_kv_heads(layer),
        }
        for layer in layers
    ]


def per_layer_widths(config: Any) -> list[dict[str, int]] | None:
    """The `edgetune_layer_widths` of `config` (a config object or a config.json dict), if any."""
    if isinstance(config, dict):
        return config.get(LAYER_WIDTHS)
    return getattr(config, LAYER_WIDTHS, None)


@torch.no_grad()
def load_layer_widths(folder: str | Path) -> Any:
    """Load a model saved with per-layer widths (config.json has `edgetune_layer_widths`).

    Builds the stock model from config.json (stock widths >= every layer's), prunes each
    layer to its recorded widths with the first-n indices, then loads the weights strictly.

    Raises:
        PruneError: the weights do not match the recorded widths (a missing or extra tensor).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    widths = per_layer_widths(config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    first_n = tuple(tuple(range(w["intermediate_size"])) for w in widths)
    kv = tuple(tuple(range(w["num_key_value_heads"])) for w in widths)
    prune(model, KeptIndices(mlp=first_n, kv_groups=kv))
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise PruneError(
            f"{folder} does not match its edgetune_layer_widths (missing "
            f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}); "
            "save the pruned model again with save_pretrained()."
        )
    if tied:
        model.tie_weights()
    return model.eval()


def _check_fits(layers: list[Any], kept: KeptIndices) -> None:
    """Raise `PruneError` unless `kept` names existing units of every layer."""
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
