"""MeZO / SPSA: the two-point randomized gradient estimate, in place.

Malladi et al., "Fine-Tuning Language Models with Just Forward Passes" (2023). For each
query i = 0..q-1 with seed s_i = derive(step_seed, i) and z_i = z(s_i) ~ N(0, I):

    central:    c_i = (L(theta + eps z_i) - L(theta - eps z_i)) / (2 eps)
    one-sided:  c_i = (L(theta + eps z_i) - L(theta)) / eps

and the gradient estimate is (1/q) sum_i c_i z_i. Parameters are perturbed in place
(+eps, -2eps, +eps) and z is regenerated from its seed each time, never stored. The q
queries run one after another here; P-RGE runs them side by side in one batched pass.

Restoring by subtraction leaves fp32 rounding behind (theta + eps z - eps z != theta in
the last bit). With `exact_restore` the estimator keeps one copy of the trainable tensors
and restores by copying: cheap for a LoRA adapter, and it makes a step a pure function of
theta, so a recorded (seeds, scalars) trace replays bit-for-bit. For full-parameter ZO
leave it off to keep the memory of inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgetune.zo.directions import loss_at, snapshot
from edgetune.zo.estimate import LossFn, ZOEstimate
from edgetune.zo.seeds import derive_seed


@dataclass
class MeZOEstimator:
    """Sequential two-point estimator.

    Attributes:
        eps: perturbation scale.
        queries: number of directions q averaged per step.
        one_sided: use (L+ - L0)/eps with one shared L0 instead of the central difference.
        exact_restore: restore theta from a copy instead of by subtraction.
    """

    eps: float = 1e-3
    queries: int = 1
    one_sided: bool = False
    exact_restore: bool = False

    def estimate(self, loss_fn: LossFn, params: list[torch.Tensor], step_seed: int) -> ZOEstimate:
        """Estimate the gradient at `params`; see the module docstring for the equations."""
        seeds = [derive_seed(step_seed, i) for i in range(self.queries)]
        saved = snapshot(params) if self.exact_restore else None
        scalars: list[float] = []
        losses: list[float] = []
        base = loss_fn() if self.one_sided else None
        for seed in seeds:
            plus = loss_at(loss_fn, params, seed, self.eps, saved)
            if base is not None:
                scalars.append((plus - base) / self.eps)
                losses.append(base)
            else:
                minus = loss_at(loss_fn, params, seed, -self.eps, saved)
                scalars.append((plus - minus) / (2.0 * self.eps))
                losses.append(0.5 * (plus + minus))
        passes = self.queries * (1 if self.one_sided else 2) + (1 if self.one_sided else 0)
        return ZOEstimate(seeds, scalars, sum(losses) / len(losses), passes)
