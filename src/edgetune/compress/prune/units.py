"""The prunable units of a Llama-family decoder and the `KeptIndices` value.

Two units, each removed whole so the tensors stay dense:

- an MLP intermediate channel `j` of a layer: row `j` of `gate_proj` and `up_proj`
  (shape [intermediate, hidden]) and column `j` of `down_proj` ([hidden, intermediate]);
- a key/value group `g` of a layer: the k/v head `g` (rows `g*d:(g+1)*d` of `k_proj` and
  `v_proj`, with `d = head_dim`), its `r = num_attention_heads / num_key_value_heads` query
  heads `g*r .. g*r+r-1` (those rows of `q_proj`) and the matching columns of `o_proj`.
  Removing whole groups keeps grouped-query attention's head-to-group mapping intact;
- a whole decoder layer `i`: the block is dropped and the residual stream passes it
  unchanged (identity), the later layers are renumbered.

`KeptIndices` says, per layer, which channels and which groups survive (sorted, in the
original numbering), and which layers survive (`layers`; None = all). `mlp` and `kv_groups`
always have one entry per ORIGINAL layer; the entries of removed layers are ignored. It is a
plain value (JSON round-trip via `to_dict` / `from_dict`) because
anything that must follow the pruning, such as a LoRA adapter's A columns and B rows or a
FedSpine client mapping its update back to the full model, needs the same indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgetune.errors import EdgetuneError

SUPPORTED = "Llama-family causal LMs (LlamaForCausalLM layout: model.layers[i].self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj), e.g. SmolLM2 and stories260K"


class PruneError(EdgetuneError):
    """A pruning request the model cannot satisfy (bad ratio, unknown unit, unsupported layout)."""


@dataclass(frozen=True)
class KeptIndices:
    """The units that survive pruning, per decoder layer, in the original numbering.

    Attributes:
        mlp: for each layer, the kept intermediate channels (sorted).
        kv_groups: for each layer, the kept key/value heads (sorted); each brings its
            `num_attention_heads // num_key_value_heads` query heads along.
        layers: the kept decoder layers (sorted, original numbering); None keeps every layer.
    """

    mlp: tuple[tuple[int, ...], ...]
    kv_groups: tuple[tuple[int, ...], ...]
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.mlp) != len(self.kv_groups):
            raise PruneError(
                f"KeptIndices has {len(self.mlp)} MLP layers but {len(self.kv_groups)} attention "
                "layers; give one entry per decoder layer in both."
            )
        for name, per_layer in (("mlp", self.mlp), ("kv_groups", self.kv_groups)):
            for i, kept in enumerate(per_layer):
                if not kept:
                    raise PruneError(
                        f"layer {i} keeps no {name} units, which would cut the network; "
                        "lower the pruning ratio so every layer keeps at least one."
                    )
                if list(kept) != sorted(set(kept)) or kept[0] < 0:
                    raise PruneError(
                        f"layer {i} {name} indices {kept} must be distinct, non-negative and "
                        "sorted; build KeptIndices with select_kept()."
                    )
        self._check_layers()

    def _check_layers(self) -> None:
        """Raise `PruneError` unless `layers` is None or a non-empty sorted subset of the layers."""
        if self.layers is None:
            return
        if not self.layers:
            raise PruneError(
                "KeptIndices keeps no decoder layer, which would cut the network; lower the "
                "pruning ratio so at least one layer survives."
            )
        valid = list(self.layers) == sorted(set(self.layers)) and self.layers[0] >= 0
        if not valid or self.layers[-1] >= len(self.mlp):
            raise PruneError(
                f"kept layers {self.layers} must be distinct, sorted and below {len(self.mlp)}; "
                "build KeptIndices with select_kept()."
            )

    @property
    def kept_layers(self) -> tuple[int, ...]:
        """The surviving decoder layers in the original numbering (all when `layers` is None)."""
        return tuple(range(len(self.mlp))) if self.layers is None else self.layers

    @property
    def num_layers(self) -> int:
        """Number of decoder layers described."""
        return len(self.mlp)

    def query_heads(self, layer: int, group_size: int) -> tuple[int, ...]:
        """The kept query heads of `layer`, given `group_size` query heads per k/v head."""
        return tuple(g * group_size + h for g in self.kv_groups[layer] for h in range(group_size))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (lists of lists; `layers` is null when every layer is kept)."""
        return {
            "mlp": [list(k) for k in self.mlp],
            "kv_groups": [list(k) for k in self.kv_groups],
            "layers": None if self.layers is None else list(self.layers),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KeptIndices:
        """Inverse of `to_dict`."""
        return cls(
            mlp=tuple(tuple(int(i) for i in k) for k in data["mlp"]),
            kv_groups=tuple(tuple(int(i) for i in k) for k in data["kv_groups"]),
            layers=None if data.get("layers") is None else tuple(int(i) for i in data["layers"]),
        )

    @classmethod
    def everything(cls, model: Any) -> KeptIndices:
        """Every unit of `model` kept (the identity pruning)."""
        layers = llama_layers(model)
        mlp = tuple(tuple(range(layer.mlp.down_proj.in_features)) for layer in layers)
        kv = tuple(tuple(range(num_kv_heads(layer))) for layer in layers)
        return cls(mlp=mlp, kv_groups=kv)


def llama_layers(model: Any) -> list[Any]:
    """The decoder layers of a Llama-layout causal LM; raises `PruneError` for other layouts."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    needed = [f"self_attn.{p}_proj" for p in "qkvo"]
    needed += [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    if layers is None or len(layers) == 0:
        raise PruneError(f"{type(model).__name__} has no model.layers; supported: {SUPPORTED}.")
    names = {name for name, _ in layers[0].named_modules()}
    missing = [n for n in needed if n not in names]
    if missing:
        raise PruneError(
            f"{type(model).__name__} lacks {', '.join(missing)} in its decoder layers; "
            f"supported: {SUPPORTED}."
        )
    return list(layers)


def head_dim(layer: Any) -> int:
    """Width of one attention head in `layer`."""
    return int(layer.self_attn.head_dim)


def num_kv_heads(layer: Any) -> int:
    """Number of key/value heads (groups) in `layer`."""
    return layer.self_attn.k_proj.out_features // head_dim(layer)


def group_size(layer: Any) -> int:
    """Query heads per key/value head in `layer`."""
    return int(layer.self_attn.num_key_value_groups)


def loadable_kv_counts(layer: Any) -> tuple[int, ...]:
    """Key/value group counts a stock transformers Llama config accepts for `layer`'s shapes.

    transformers' `LlamaConfig` refuses, at load time, a `hidden_size` that is not a multiple
    of `num_attention_heads` (even with an explicit `head_dim`), so keeping `g` groups is
    loadable only when `hidden_size % (g * group_size) == 0`.
    """
    hidden, r = layer.self_attn.q_proj.in_features, group_size(layer)
    return tuple(g for g in range(1, num_kv_heads(layer) + 1) if hidden % (g * r) == 0)
