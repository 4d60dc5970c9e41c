"""FedSpine's device models: pruned copies of the pristine base with the global adapter's shape.

A device at pruning ratio `p` trains `prune(base, kept)` with a LoRA adapter attached by
the same `PeftConfig` as the global one. Attaching the GLOBAL rank and config (never the
device's rank) keeps two things equal to the global adapter: the tensor names (FedSpine
drops no layer, so `prune` renumbers nothing) and the LoRA scale `alpha / R`; a rank-r
device trains the prefix through `edgetune.fed.hetlora.at_rank`. Its tensors are the
global ones gathered with `order.index_map`, loaded with `load_trainable`.

`SubModels` builds them from a copy of the base taken once without the LoRA layers (PEFT
`unload`, which removes them without merging), and caches the last few, since a simulator
cycles through a handful of ratios. `client_stats` is the device side of the ordering:
forward-only activation importance (Wanda-sp, `activation_scores`) of the units it holds.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from edgetune.compress.prune import KeptIndices, activation_scores, prune
from edgetune.errors import ConfigError
from edgetune.peft import Adapter, PeftConfig, attach

LORA_METHODS = ("lora", "lora-fa")
"""PEFT methods a FedSpine sub-model can carry (their tensors follow the pruned units)."""


class SubModels:
    """Pruned copies of the pristine base model, each with a LoRA adapter of the GLOBAL
    rank and config attached (so adapter names equal the global adapter's and its LoRA scale
    is the global one; a rank-r client trains through `at_rank(adapter, r)`)."""

    def __init__(self, adapter: Adapter, peft_cfg: PeftConfig, seed: int, keep: int = 2) -> None:
        """Remember the global adapter; the base copy is taken on the first `get`.

        Args:
            adapter: the federation's global Adapter, whose base weights are pristine (its
                LoRA is not merged into them).
            peft_cfg: the global PEFT config (method lora or lora-fa).
            seed: seeds each sub-model's LoRA init (overwritten by the caller's load).
            keep: how many sub-models to cache (least recently used goes first).

        Raises:
            ConfigError: the method is not LoRA, or `keep` is below 1.
        """
        if peft_cfg.method not in LORA_METHODS or adapter.method not in LORA_METHODS:
            raise ConfigError(
                f"FedSpine prunes the base under a LoRA adapter, but peft.method is "
                f"{peft_cfg.method}; use --peft lora or lora-fa"
            )
        if keep < 1:
            raise ConfigError(f"SubModels keep must be >= 1, got {keep}")
        self.adapter, self.peft_cfg, self.seed, self.keep = adapter, peft_cfg, seed, keep
        self._base: torch.nn.Module | None = None
        self._cache: OrderedDict[KeptIndices, Adapter] = OrderedDict()

    def base(self) -> torch.nn.Module:
        """The global model without its LoRA layers (a copy, taken once)."""
        if self._base is None:
            self._base = copy.deepcopy(self.adapter.model).unload()  # type: ignore[operator]
        return self._base

    def get(self, kept: KeptIndices) -> Adapter:
        """The sub-model of `kept` with the global-shaped adapter attached (cached).

        The caller loads its tensors (`load_trainable(sub, gather(state, index_map(...)))`).

        Raises:
            ValueError: `kept` drops layers (FedSpine sub-models keep every layer).
            PruneError: `kept` does not fit the model.
        """
        if kept in self._cache:
            self._cache.move_to_end(kept)
            return self._cache[kept]
        if kept.layers is not None:
            raise ValueError("FedSpine sub-models keep every layer; got a KeptIndices with layers")
        pruned = prune(copy.deepcopy(self.base()), kept)
        sub = attach(pruned, self.peft_cfg, self.seed)
        self._cache[kept] = sub
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return sub


def client_stats(
    adapter: Adapter, kept: KeptIndices, batches: Iterable[torch.Tensor | Mapping[str, Any]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-only unit importance on a device's sub-model, flat, for `UnitOrder.update`.

    Runs `activation_scores` on the model under the PEFT wrapper, so the activations pass
    through the adapter's current LoRA (at whatever rank is active); the weight factor is
    the pruned base weight. The model is put in eval mode for the passes (no LoRA dropout)
    and restored.

    Args:
        adapter: the sub-model of `kept` (`SubModels.get`).
        kept: its units, in the global numbering.
        batches: calibration batches (`input_ids` [B, T] or mappings with an attention mask).

    Returns:
        (mlp, kv) float32: each layer's scores of its kept units in kept order, concatenated
        over layers.

    Raises:
        ValueError: the model's widths are not those of `kept`.
        PruneError: no batches.
    """
    model: Any = adapter.model
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = inner.training
    inner.eval()
    try:
        scores = activation_scores(inner, batches)
    finally:
        inner.train(was_training)
    widths = [(t.numel(), g.numel()) for t, g in zip(scores.mlp, scores.kv_groups, strict=True)]
    expected = [(len(m), len(g)) for m, g in zip(kept.mlp, kept.kv_groups, strict=True)]
    if widths != expected:
        raise ValueError(f"the sub-model's widths {widths[:2]}... are not kept's {expected[:2]}...")
    mlp = torch.cat([t.float().cpu() for t in scores.mlp])
    kv = torch.cat([t.float().cpu() for t in scores.kv_groups])
    return mlp, kv
