"""Sign-ZO: step along the sign of the (seeds, scalars) gradient estimate.

    theta <- theta - lr * ( sign(g_hat) + weight_decay * theta ),  g_hat = (1/q) sum_i c_i z(s_i)

signSGD-style: robust to the heavy-tailed scale of ZO estimates; every coordinate moves
by exactly lr, so lr is the per-step change (use a small one, e.g. 1e-5 .. 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgetune.zo.directions import materialize
from edgetune.zo.estimate import ZOEstimate


@dataclass
class ZOSign:
    """Sign-ZO (stateless).

    Attributes:
        weight_decay: decoupled L2 coefficient.
    """

    weight_decay: float = 0.0

    @torch.no_grad()
    def step(self, params: list[torch.Tensor], estimate: ZOEstimate, lr: float) -> None:
        """Apply one update."""
        for p, g in zip(params, materialize(params, estimate), strict=True):
            if self.weight_decay:
                p.mul_(1.0 - lr * self.weight_decay)
            p.add_(g.sign(), alpha=-lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """No state."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """No state to load."""
