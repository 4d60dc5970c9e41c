"""SmoothQuant-style smoothing: move activation outliers into the weights, so that
per-tensor int8 activations (`compress/int8_dynamic.py`) lose less.

Paper: Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models". A linear layer `y = x @ W^T` (x (..., K), W (N, K)) computes
the same `y` from `x / s` and `W * s` (each input channel j of x divided by `s[j]`, each
column j of W multiplied by it). With

    s[j] = max|X[:, j]| ** alpha / max|W[:, j]| ** (1 - alpha),   alpha = 0.7,

(`max|X[:, j]|` over calibration tokens, `max|W[:, j]|` over the columns of every layer that
reads x) a few huge activation channels, which set the one int8 scale of a whole
activation tensor and flush the other channels to zero, are shrunk and the weights take
the difference; weights are quantized per output row, so they absorb it cheaply.

The division by `s` is folded into whatever produces x, so the model computes the same
function in fp32 and costs nothing at run time. Per Llama decoder layer:
- q/k/v input: `input_layernorm.weight / s`, q/k/v columns `* s`;
- gate/up input: `post_attention_layernorm.weight / s`, gate/up columns `* s`;
- down_proj input `silu(gate) * up`: up_proj ROWS `/ s` (the product is linear in up),
  down_proj columns `* s`;
- o_proj input (the attention output): v_proj ROWS `/ s`. Attention mixes v rows with
  weights that sum to one, so scaling a channel of v scales the same channel of every
  query head that reads it. With grouped-query attention one v head feeds several query
  heads, so `s` is taken per v channel: the maximum of `max|X|` over the query heads of a
  group, the same for `max|W|` over the o_proj columns they own.

Activation maxima are measured on the unsmoothed model in one pass (all four inputs),
then the folds are applied; each fold preserves the function, so the order does not
change the result in exact arithmetic. A channel never active in calibration keeps
`s = 1`, so an unseen input cannot meet a norm weight divided by a tiny number.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from edgetune.compress.prune.units import head_dim, llama_layers, num_kv_heads

# The paper's 0.5 left SmolLM2-135M's dynamic int8 logits 43 % / 38 % (max error, of the
# largest logit) from fp32 with 77 % / 62 % top-1 agreement on two 128-token stories;
# 0.7 gives 24 % / 19 % and 91 % / 84 % (0.6: 31 % / 30 %, 0.85: 23 % / 17 %), 8 x 128
# calibration tokens from other stories.
ALPHA = 0.7
# the linear layers whose inputs are measured, per decoder layer
INPUTS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


@torch.no_grad()
def activation_maxima(model: nn.Module, batches: Iterable[dict[str, Any]]) -> list[dict]:
    """Per decoder layer, `max|X[:, j]|` over every calibration token of the inputs of
    q_proj (= k/v), o_proj, gate_proj (= up) and down_proj.

    Args:
        model: a Llama-layout causal LM (fp32, unsmoothed).
        batches: model inputs (input_ids, attention_mask), no labels.

    Returns:
        One dict per decoder layer, {module path in INPUTS: (in_features,) fp32 maxima}.
    """
    layers = llama_layers(model)
    maxima: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        for path in INPUTS:
            hook = _recorder(maxima[i], path)
            handles.append(layer.get_submodule(path).register_forward_pre_hook(hook))
    try:
        for batch in batches:
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def _recorder(store: dict[str, torch.Tensor], path: str) -> Any:
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().float()
        peak = x.reshape(-1, x.shape[-1]).abs().amax(dim=0)
        store[path] = peak if path not in store else torch.maximum(store[path], peak)

    return hook


@torch.no_grad()
def smooth(model: nn.Module, maxima: list[dict], alpha: float = ALPHA) -> nn.Module:
    """Fold SmoothQuant scales into every decoder layer of `model`, in place.

    Args:
        model: the model `maxima` was measured on (no LoRA layers: merge them first).
        maxima: `activation_maxima(model, ...)`.
        alpha: migration strength in [0, 1]: the share of each activation channel's
            range moved into the weights (0.5 balances the two).

    Returns:
        The same model; its fp32 outputs are unchanged up to rounding.
    """
    for layer, peaks in zip(llama_layers(model), maxima, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        s = _scales(peaks["self_attn.q_proj"], qkv, alpha)
        _fold_into_columns(qkv, s)
        layer.input_layernorm.weight.div_(s)
        s = _scales(peaks["mlp.gate_proj"], (mlp.gate_proj, mlp.up_proj), alpha)
        _fold_into_columns((mlp.gate_proj, mlp.up_proj), s)
        layer.post_attention_layernorm.weight.div_(s)
        s = _scales(peaks["mlp.down_proj"], (mlp.down_proj,), alpha)
        _fold_into_columns((mlp.down_proj,), s)
        _divide_rows(mlp.up_proj, s)
        s = _grouped_scales(layer, peaks["self_attn.o_proj"], alpha)
        _divide_rows(attn.v_proj, s)
        _fold_into_columns((attn.o_proj,), _per_query_head(layer, s))
    return model


def _scales(act_max: torch.Tensor, linears: Iterable[nn.Linear], alpha: float) -> torch.Tensor:
    """`s[j] = max|X_j|^alpha / max|W_j|^(1-alpha)`, W the columns of every reader of X."""
    w_max = torch.stack([lin.weight.abs().amax(dim=0) for lin in linears]).amax(dim=0)
    return _ratio(act_max, w_max, alpha)


def _ratio(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    s = act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    # a channel silent in calibration (or a zeroed weight column) is left alone
    return torch.where((act_max > 0) & (w_max > 0), s.clamp(min=1e-5), torch.ones_like(s))


def _grouped_scales(layer: nn.Module, act_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """One scale per v_proj output channel, (kv_heads * head_dim,): the o_proj input
    maxima and o_proj column maxima, each maxed over the query heads sharing a v head.

    o_proj's input is laid out (query head, head_dim) and query head h reads v head
    h // group (transformers' `repeat_kv`).
    """
    kv, dim, group = num_kv_heads(layer), head_dim(layer), _group_size(layer)
    w_max = layer.self_attn.o_proj.weight.abs().amax(dim=0)
    act = act_max.reshape(kv, group, dim).amax(dim=1)
    w = w_max.reshape(kv, group, dim).amax(dim=1)
    return _ratio(act.reshape(-1), w.reshape(-1), alpha)


def _per_query_head(layer: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """The per-v-channel scales laid out as o_proj's input, (heads * head_dim,)."""
    per_kv = s.reshape(num_kv_heads(layer), head_dim(layer))
    return per_kv.repeat_interleave(_group_size(layer), dim=0).reshape(-1)


def _group_size(layer: nn.Module) -> int:
    heads = layer.self_attn.q_proj.out_features // head_dim(layer)
    return heads // num_kv_heads(layer)


def _fold_into_columns(linears: Iterable[nn.Linear], s: torch.Tensor) -> None:
    for lin in linears:
        lin.weight.mul_(s)


def _divide_rows(linear: nn.Linear, s: torch.Tensor) -> None:
    linear.weight.div_(s[:, None])
    if linear.bias is not None:
        linear.bias.div_(s)
