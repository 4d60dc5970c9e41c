"""Projected gradients divided by their running RMS: a ZO step whose size does not grow
with the loss's scale.

A ZO-SGD step is theta -= lr * c * z with c ~ grad(L) . z. Measured on SmolLM2 (P-RGE,
AG News, lr 5e-3), the mean |c| grew from 0.8 to 2.5 over 90 steps as the model became
sharper on the task, so a fixed lr took ever larger steps: the positive feedback behind
runs that learn, then climb away. Dividing each scalar by the running root mean square of
the scalars keeps the step's expected size at lr * |z| (scale-free in the loss), while its
sign and relative size still follow the measured slope:

    v_t   = beta * v_{t-1} + (1 - beta) * mean_i(c_i^2)       (bias-corrected, v_hat_t)
    c'_i  = c_i / sqrt(v_hat_t)

The current step is in v_t, so |c'_i| <= 1 / sqrt(1 - beta) (3.2 at beta 0.9) however far a
scalar spikes. The normalised scalars replace the raw ones in the estimate: the trace
records what was applied, and replaying it as plain ZO-SGD gives the same update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from edgetune.zo.estimate import ZOEstimate


@dataclass
class RMSNormalizer:
    """Divides each step's scalars by their running RMS (state: the moving average).

    Attributes:
        beta: decay of the moving average of the squared scalars.
    """

    beta: float = 0.9
    mean_sq: float = 0.0
    steps: int = 0

    def __call__(self, estimate: ZOEstimate) -> ZOEstimate:
        """The estimate with normalised scalars; `extras["scalar_rms"]` is the divisor."""
        square = sum(c * c for c in estimate.scalars) / len(estimate.scalars)
        if not math.isfinite(square):  # a diverged loss: leave it for the guard to see
            return estimate
        self.steps += 1
        self.mean_sq = self.beta * self.mean_sq + (1.0 - self.beta) * square
        rms = math.sqrt(self.mean_sq / (1.0 - self.beta**self.steps))
        if rms == 0.0:  # a flat loss: no slope to follow
            return estimate
        scalars = [c / rms for c in estimate.scalars]
        return replace(estimate, scalars=scalars, extras={**estimate.extras, "scalar_rms": rms})

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The moving average and its step count (tensors: checkpoints load weights_only)."""
        return {
            "mean_sq": torch.tensor(self.mean_sq, dtype=torch.float64),
            "steps": torch.tensor(self.steps),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the moving average."""
        if state:
            self.mean_sq = float(state["mean_sq"])
            self.steps = int(state["steps"])
