"""ZO-Adam: Adam's moment estimates driven by the (seeds, scalars) gradient estimate.

    g_hat = (1/q) sum_i c_i z(s_i)
    m <- b1 m + (1 - b1) g_hat;   v <- b2 v + (1 - b2) g_hat^2;   t <- t + 1
    theta <- theta - lr * ( m/(1 - b1^t) / (sqrt(v/(1 - b2^t)) + eps) + weight_decay * theta )

Two state tensors per trainable tensor (as first-order Adam). Useful when ZO-SGD's
per-coordinate scale is badly matched (e.g. LoRA A vs B).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edgetune.zo.directions import materialize
from edgetune.zo.estimate import ZOEstimate


@dataclass
class ZOAdam:
    """Adam-style ZO optimizer.

    Attributes:
        beta1: first-moment decay.
        beta2: second-moment decay.
        eps: denominator guard.
        weight_decay: decoupled L2 coefficient.
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    t: int = 0
    m: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)

    @torch.no_grad()
    def step(self, params: list[torch.Tensor], estimate: ZOEstimate, lr: float) -> None:
        """Apply one update."""
        grads = materialize(params, estimate)
        if not self.m:
            self.m = [torch.zeros_like(p) for p in params]
            self.v = [torch.zeros_like(p) for p in params]
        self.t += 1
        c1, c2 = 1.0 - self.beta1**self.t, 1.0 - self.beta2**self.t
        for p, g, m, v in zip(params, grads, self.m, self.v, strict=True):
            m.mul_(self.beta1).add_(g, alpha=1.0 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
            if self.weight_decay:
                p.mul_(1.0 - lr * self.weight_decay)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-lr / c1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Moments and the step count."""
        state = {f"m.{i}": m for i, m in enumerate(self.m)}
        state.update({f"v.{i}": v for i, v in enumerate(self.v)})
        state["t"] = torch.tensor(self.t)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore moments and step count."""
        n = sum(1 for k in state if k.startswith("m."))
        self.m = [state[f"m.{i}"].clone() for i in range(n)]
        self.v = [state[f"v.{i}"].clone() for i in range(n)]
        self.t = int(state.get("t", torch.tensor(0)))
