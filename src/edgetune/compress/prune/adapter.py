"""Carry an existing LoRA adapter through structured pruning.

A LoRA update of a projection is `scale * B @ A` with `A` of shape [r, in] and `B` of shape
[out, r]. Pruning keeps some output rows and/or input columns of the projection, and the
kept sub-block of `B @ A` is exactly `B[rows] @ A[:, cols]`, so the mapped adapter on the
pruned base computes what the full adapter on the unpruned base computes with the pruned
units zeroed. Per projection of layer `i` (with `C` the kept MLP channels, `Q` the kept query
heads' dims and `K` the kept key/value heads' dims):

- `gate_proj`, `up_proj`: B rows `C`;   `down_proj`: A columns `C`;
- `q_proj`: B rows `Q`;   `k_proj`, `v_proj`: B rows `K`;   `o_proj`: A columns `Q`.

A removed decoder layer takes its LoRA tensors with it; the tensors of the later layers are
renamed to the new layer numbers (`model.layers.4.` -> `model.layers.3.` when one earlier
layer is gone), as `prune` renumbers the layers.

`lora_index_map` gives those indices as a value (FedSpine maps client updates with them);
`map_lora` applies them to an adapter state dict; `map_adapter_folder` does it to a saved
PEFT adapter folder so `PeftModel.from_pretrained(pruned_base, folder)` loads it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from edgetune.compress.prune.units import KeptIndices, PruneError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# `...model.layers.{i}.{self_attn|mlp}.{name}_proj.lora_{A|B}[.{adapter}].{weight|bias}`
_LORA_KEY = re.compile(
    r"(?:^|\.)(?P<module>model\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<proj>\w+_proj))"
    r"\.(?P<part>[^.]+)(?:\.[^.]+)*\.(?P<kind>weight|bias)$"
)
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Indices = tuple[int, ...]


class AdapterMismatchError(PruneError):
    """A LoRA adapter that does not belong to the model being pruned, or cannot be mapped."""


def lora_index_map(
    kept: KeptIndices, config: Any
) -> dict[str, tuple[Indices | None, Indices | None]]:
    """The kept input columns and output rows of every pruned projection.

    Args:
        kept: the surviving units (from `select_kept`).
        config: the UNPRUNED model's config (`prune` rewrites the config in place, so take a
            copy first); it gives `head_dim` and the query heads per key/value head.

    Returns:
        `{"model.layers.{i}.self_attn.q_proj": (in_idx, out_idx), ...}` for the seven
        projections of every KEPT layer, in the original numbering (removed layers are
        absent). `None` means "all kept" (the
        hidden-size side, which pruning never touches). LoRA A columns follow `in_idx`,
        B rows follow `out_idx`.
    """
    _check_kept_fits(kept, config)
    d, r = _head_dim(config), _group_size(config)
    index_map: dict[str, tuple[Indices | None, Indices | None]] = {}
    for i in kept.kept_layers:
        channels = tuple(kept.mlp[i])
        kv_dims = _head_dims(kept.kv_groups[i], d)
        q_dims = _head_dims(kept.query_heads(i, r), d)
        prefix = f"model.layers.{i}"
        index_map[f"{prefix}.self_attn.q_proj"] = (None, q_dims)
        index_map[f"{prefix}.self_attn.k_proj"] = (None, kv_dims)
        index_map[f"{prefix}.self_attn.v_proj"] = (None, kv_dims)
        index_map[f"{prefix}.self_attn.o_proj"] = (q_dims, None)
        index_map[f"{prefix}.mlp.gate_proj"] = (None, channels)
        index_map[f"{prefix}.mlp.up_proj"] = (None, channels)
        index_map[f"{prefix}.mlp.down_proj"] = (channels, None)
    return index_map


def map_lora(
    lora_tensors: dict[str, torch.Tensor], kept: KeptIndices, config: Any
) -> dict[str, torch.Tensor]:
    """The adapter state dict for the pruned model: A columns and B rows sliced to `kept`.

    Args:
        lora_tensors: a PEFT LoRA state dict as saved in `adapter_model.safetensors`.
        kept: the surviving units.
        config: the UNPRUNED model's config (see `lora_index_map`).

    Returns:
        A new dict with the same keys, less those of removed layers and with later layers
        renumbered; tensors of modules outside the decoder projections
        (e.g. an `lm_head` LoRA, whose widths pruning does not change) are passed through.

    Raises:
        AdapterMismatchError: a tensor's width differs from the unpruned model's (an adapter
            for another base model), names a layer the model lacks, or is not LoRA A/B.
    """
    index_map = lora_index_map(kept, config)
    widths = _widths(config)
    renumber = {old: new for new, old in enumerate(kept.kept_layers)}
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in lora_tensors.items():
        match = _LORA_KEY.search(key)
        if match is None or match["proj"] not in _PROJECTIONS:
            mapped[key] = tensor
            continue
        module, part, kind, layer = (
            match["module"],
            match["part"],
            match["kind"],
            int(match["layer"]),
        )
        if layer >= kept.num_layers:
            raise AdapterMismatchError(
                f"adapter tensor {key} is for layer {layer} but the model has "
                f"{kept.num_layers} layers; use the adapter trained on this base model."
            )
        if module not in index_map:
            continue  # its layer was pruned away
        key = _renamed(key, match, renumber[layer])
        in_idx, out_idx = index_map[module]
        in_width, out_width = widths[match["proj"]]
        if part == "lora_A" and kind == "weight":
            _check_width(key, tensor, 1, in_width)
            mapped[key] = _take(tensor, 1, in_idx)
        elif part == "lora_B":
            _check_width(key, tensor, 0, out_width)
            mapped[key] = _take(tensor, 0, out_idx)
        else:
            raise AdapterMismatchError(
                f"adapter tensor {key} ({part}.{kind}) is not a plain LoRA A/B matrix and cannot "
                "be carried through pruning; use a plain LoRA adapter (no DoRA magnitude, no "
                "modules_to_save copy of a pruned projection)."
            )
    return mapped


def map_adapter_folder(
    source: str | Path,
    target: str | Path,
    kept: KeptIndices,
    config: Any,
    base_model: str | Path | None = None,
) -> Path:
    """Write the pruned-model version of the saved PEFT adapter folder `source` into `target`.

    `adapter_config.json` is copied; its `base_model_name_or_path` is set to `base_model`
    (the pruned model's folder) when given, so the mapped adapter names the base it fits.

    Raises:
        AdapterMismatchError: `source` is not a PEFT adapter folder with safetensors weights,
            or the adapter does not fit the unpruned model (see `map_lora`).
    """
    source, target = Path(source), Path(target)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (source / name).is_file():
            raise AdapterMismatchError(
                f"{source} has no {name}; give a PEFT adapter folder saved with "
                "save_pretrained(..., safe_serialization=True)."
            )
    adapter_config = json.loads((source / ADAPTER_CONFIG).read_text())
    if base_model is not None:
        adapter_config["base_model_name_or_path"] = str(base_model)
    tensors = map_lora(load_file(str(source / ADAPTER_WEIGHTS)), kept, config)
    target.mkdir(parents=True, exist_ok=True)
    (target / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(target / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return target


def _renamed(key: str, match: re.Match[str], new_layer: int) -> str:
    """`key` with its `model.layers.{i}.` renumbered to `new_layer`."""
    start, end = match.span("layer")
    return key[:start] + str(new_layer) + key[end:]


def _check_kept_fits(kept: KeptIndices, config: Any) -> None:
    """Raise `AdapterMismatchError` if `kept` names units beyond `config`'s (a pruned config?)."""
    d = _head_dim(config)
    kv_heads = _widths(config)["k_proj"][1] // d
    limits = (
        ("mlp", kept.mlp, int(config.intermediate_size)),
        ("kv_groups", kept.kv_groups, kv_heads),
    )
    for name, per_layer, n in limits:
        top = max(idx[-1] for idx in per_layer)
        if top >= n:
            raise AdapterMismatchError(
                f"kept {name} index {top} is beyond the config's {n} units: the config is "
                "probably the pruned one (prune() rewrites it in place); pass a copy of the "
                "unpruned model's config taken before prune()."
            )


def _head_dim(config: Any) -> int:
    """Per-head width: the explicit `head_dim`, else `hidden_size / num_attention_heads`."""
    explicit = getattr(config, "head_dim", None)
    return int(explicit or config.hidden_size // config.num_attention_heads)


def _group_size(config: Any) -> int:
    """Query heads per key/value head."""
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(config.num_attention_heads // kv)


def _widths(config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of the unpruned model described by `config`."""
    d, hidden, mlp = _head_dim(config), int(config.hidden_size), int(config.intermediate_size)
    q = int(config.num_attention_heads) * d
    kv = q // _group_size(config)
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, mlp),
        "up_proj": (hidden, mlp),
        "down_proj": (mlp, hidden),
    }


def _check_width(key: str, tensor: torch.Tensor, dim: int, expected: int) -> None:
    """Raise `AdapterMismatchError` unless `tensor.shape[dim] == expected`."""
    if tensor.dim() <= dim or tensor.shape[dim] != expected:
        raise AdapterMismatchError(
            f"adapter tensor {key} has shape {tuple(tensor.shape)} but the unpruned model's "
            f"projection has width {expected} there: the adapter was trained on another base "
            "model; use an adapter trained on the model being pruned (and pass its unpruned "
            "config)."
        )


def _head_dims(heads: tuple[int, ...], d: int) -> Indices:
    """Dims `h*d .. h*d+d-1` of each head in `heads`."""
    return tuple(h * d + j for h in heads for j in range(d))


def _take(tensor: torch.Tensor, dim: int, idx: Indices | None) -> torch.Tensor:
    """`tensor` restricted to `idx` along `dim` (a copy; unchanged when `idx` is None)."""
    if idx is None:
        return tensor.clone()
    return tensor.index_select(dim, torch.tensor(idx, dtype=torch.long, device=tensor.device))
