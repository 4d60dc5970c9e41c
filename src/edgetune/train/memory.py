"""How much memory each training method needs, and which one a memory budget affords.

One model for every planner: the federated fleet (`fed/fleet.py`, per device profile)
and `finetune --method auto` (this machine's free memory, or `train.memory_mb`). Peak
memory is a factor of the model's fp32 weights, measured with `edgetune bench memory`
(SmolLM2-135M, batch 8 x 128): inference and ZO ~2.6x the weights (activations, logits,
runtime), P-RGE's 2q copies a little more, first-order LoRA through every block ~6.9x.
"""

from __future__ import annotations

from typing import Any

from edgetune.train.config import backpropagates

MEMORY_FACTOR = {"zo": 2.7, "prge": 3.0, "fo": 6.9}
AUTO_ORDER = ("fo", "prge", "zo")  # backprop where it fits, then batched, then sequential ZO


def method_memory_mb(num_params: int, method: str, backprop_share: float = 1.0) -> float:
    """Estimated peak memory of fine-tuning a model of `num_params` with `method`.

    `backprop_share` is the fraction of the blocks backpropagation runs through (LoRA on
    the top K of L blocks: K / L): first-order keeps activations for those blocks only,
    so its factor falls linearly from all blocks' to a forward pass's (ZO's). Measured on
    SmolLM2-135M (40 x 8 steps): top 6 of 30 blocks peaked at 1196 MB against 1821 MB for
    all blocks and 1149 MB for ZO on the top 6; the linear rule (2.7 + 4.2 x 0.2 = 3.5x
    the weights) errs on the safe side of that.
    """
    factor = MEMORY_FACTOR[method]
    if backpropagates(method):
        factor = MEMORY_FACTOR["zo"] + (factor - MEMORY_FACTOR["zo"]) * backprop_share
    return num_params * 4 / 2**20 * factor


def affordable(
    num_params: int, budget_mb: float, backprop_share: float = 1.0, backprop: bool = True
) -> str | None:
    """The first method of `AUTO_ORDER` whose estimate fits `budget_mb` (first-order only
    where the device can backpropagate), or None."""
    for method in AUTO_ORDER:
        if not backprop and backpropagates(method):
            continue
        if method_memory_mb(num_params, method, backprop_share) <= budget_mb:
            return method
    return None


def backprop_share(peft: Any, model: Any) -> float:
    """The fraction of the model's blocks backpropagation runs through: K / L with LoRA
    on the top K of L blocks (peft.layers=top:K) or last-n's K blocks, else 1."""
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    top = peft.top_layers() if peft.method in ("lora", "lora-fa") else None
    if peft.method == "last-n":
        top = peft.last_layers
    if not layers or top is None:
        return 1.0
    return min(top, layers) / layers
