"""Structured pruning of Llama-family causal LMs.

The flow is three values and three steps:
`scores = magnitude_scores(model)`, `activation_scores(model, batches)` or
`taylor_scores(model, batches)` (`importance.py`)
-> `kept = select_kept(scores, ratio, units)` (`select.py`, a `KeptIndices` value from
`units.py`) -> optionally `compensate(model, kept, input_means(model, batches))`
(`compensation.py`, FLAP bias compensation) -> `prune(model, kept)` (`structured.py`, the
physical shrink; `load_layer_widths` reloads a model saved with per-layer widths). The `KeptIndices`
value is what an adapter mapping or FedSpine needs: which rows/columns of each tensor survive.
"""

from edgetune.compress.prune.adapter import (
    AdapterMismatchError,
    lora_index_map,
    map_adapter_folder,
    map_lora,
)
from edgetune.compress.prune.compensation import compensate, input_means
from edgetune.compress.prune.importance import (
    UnitScores,
    activation_scores,
    magnitude_scores,
    taylor_scores,
)
from edgetune.compress.prune.select import select_kept
from edgetune.compress.prune.structured import (
    layer_widths,
    load_layer_widths,
    per_layer_widths,
    prune,
)
from edgetune.compress.prune.units import KeptIndices, PruneError, llama_layers

__all__ = [
    "AdapterMismatchError",
    "KeptIndices",
    "PruneError",
    "UnitScores",
    "activation_scores",
    "compensate",
    "input_means",
    "layer_widths",
    "load_layer_widths",
    "per_layer_widths",
    "llama_layers",
    "lora_index_map",
    "magnitude_scores",
    "map_adapter_folder",
    "map_lora",
    "prune",
    "select_kept",
    "taylor_scores",
]
