"""ZO-SGD with heavy-ball momentum on the (seeds, scalars) estimate.

    g_hat = (1/q) sum_i c_i z(s_i)
    m    <- beta * m + g_hat
    theta <- theta - lr * (m + weight_decay * theta)

The buffer m is the size of the trainable tensors (fine for LoRA; it doubles memory for
full-parameter ZO). Replaying the same estimates from the same state reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edgetune.zo.directions import materialize
from edgetune.zo.estimate import ZOEstimate


@dataclass
class ZOMomentum:
    """ZO-SGD with momentum.

    Attributes:
        beta: momentum coefficient.
        weight_decay: decoupled L2 coefficient.
    """

    beta: float = 0.9
    weight_decay: float = 0.0
    buffers: list[torch.Tensor] = field(default_factory=list)

    @torch.no_grad()
    def step(self, params: list[torch.Tensor], estimate: ZOEstimate, lr: float) -> None:
        """Apply one update."""
        grads = materialize(params, estimate)
        if not self.buffers:
            self.buffers = [torch.zeros_like(p) for p in params]
        for p, g, m in zip(params, grads, self.buffers, strict=True):
            m.mul_(self.beta).add_(g)
            if self.weight_decay:
                p.mul_(1.0 - lr * self.weight_decay)
            p.add_(m, alpha=-lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The momentum buffers."""
        return {f"m.{i}": m for i, m in enumerate(self.buffers)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the momentum buffers."""
        self.buffers = [state[f"m.{i}"].clone() for i in range(len(state))]
