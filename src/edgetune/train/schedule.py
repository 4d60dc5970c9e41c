"""Learning-rate schedule: linear warm-up, then constant, linear or cosine decay to zero."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, base: float, schedule: str, warmup: int) -> float:
    """The learning rate for 0-based `step` of `total`.

    Args:
        step: 0-based optimizer step.
        total: total optimizer steps.
        base: peak learning rate.
        schedule: "constant" | "linear" | "cosine".
        warmup: linear warm-up steps from base/warmup to base.
    """
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base * (1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))
