"""ZO-SGD: apply a (seeds, scalars) gradient estimate to parameters in place.

    theta <- theta - lr * ( (1/q) sum_i c_i z(s_i) + weight_decay * theta )

The same function replays a recorded estimate on another copy of the parameters (a
federated receiver, or a resumed run), so training by replay is bit-for-bit the same as
training live on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgetune.zo.directions import add_direction
from edgetune.zo.estimate import ZOEstimate


@torch.no_grad()
def apply_estimate(
    params: list[torch.Tensor], estimate: ZOEstimate, lr: float, weight_decay: float = 0.0
) -> None:
    """theta <- theta - lr * (g_hat + weight_decay * theta), in place."""
    if weight_decay:
        for p in params:
            p.mul_(1.0 - lr * weight_decay)
    q = len(estimate.seeds)
    for seed, scalar in zip(estimate.seeds, estimate.scalars, strict=True):
        add_direction(params, seed, -lr * scalar / q)


@dataclass
class ZOSGD:
    """Plain ZO-SGD (stateless).

    Attributes:
        weight_decay: decoupled L2 coefficient.
    """

    weight_decay: float = 0.0

    def step(self, params: list[torch.Tensor], estimate: ZOEstimate, lr: float) -> None:
        """Apply one update."""
        apply_estimate(params, estimate, lr, self.weight_decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """No state; kept for a uniform optimizer interface."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """No state to load."""
