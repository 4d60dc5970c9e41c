"""Forward gradient with variance-controlled sampling (FwdLLM).

Xu et al., "FwdLLM: Efficient FedLLM using Forward Gradient" (2023). Each direction z_i
gives a forward-gradient sample g_i = c_i z_i, with c_i the directional derivative
(here a central difference, (L(theta + eps z) - L(theta - eps z)) / (2 eps), so no
autograd is needed). Instead of a fixed q, directions are drawn until the estimated
variance of the running mean g_bar falls under a threshold, relative to its norm:

    var(g_bar) = (sum_i ||g_i||^2 - n ||g_bar||^2) / (n (n - 1))
    stop when  var(g_bar) / ||g_bar||^2 <= threshold   (n >= min_queries),  or n = max_queries

Discriminative sampling (optional): given a prior direction (e.g. the last global
gradient), each draw considers `candidates` seeds and keeps the one whose z has the
largest |cosine| with the prior, so samples agree with where the model was heading.
Seeds stay derived from (step_seed, i, k), so the result is still (seeds, scalars).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgetune.zo.directions import direction_vector, loss_at, snapshot
from edgetune.zo.estimate import LossFn, ZOEstimate
from edgetune.zo.seeds import derive_seed


@dataclass
class ForwardGradientEstimator:
    """Variance-controlled forward-gradient estimator.

    Attributes:
        eps: finite-difference scale for the directional derivative.
        min_queries: directions drawn before the variance test applies (>= 2).
        max_queries: cap on directions per step.
        threshold: stop when var(g_bar) / ||g_bar||^2 falls to this.
        candidates: seeds considered per draw for discriminative sampling (1 = off).
        prior: flat prior direction for discriminative sampling, or None.
        exact_restore: restore theta from a copy (see `MeZOEstimator`).
    """

    eps: float = 1e-3
    min_queries: int = 2
    max_queries: int = 16
    threshold: float = 1.0
    candidates: int = 1
    prior: torch.Tensor | None = None
    exact_restore: bool = False

    def _pick_seed(self, params: list[torch.Tensor], step_seed: int, i: int) -> int:
        if self.prior is None or self.candidates <= 1:
            return derive_seed(step_seed, i)
        seeds = [derive_seed(step_seed, i, k) for k in range(self.candidates)]
        cos = [
            abs(torch.nn.functional.cosine_similarity(direction_vector(params, s), self.prior, 0))
            for s in seeds
        ]
        return seeds[int(torch.stack(cos).argmax())]

    def estimate(self, loss_fn: LossFn, params: list[torch.Tensor], step_seed: int) -> ZOEstimate:
        """Draw directions until the variance test passes; see the module docstring."""
        seeds: list[int] = []
        scalars: list[float] = []
        losses: list[float] = []
        total: torch.Tensor | None = None
        sq_norms = 0.0
        ratio = float("inf")
        saved = snapshot(params) if self.exact_restore else None
        for i in range(self.max_queries):
            seed = self._pick_seed(params, step_seed, i)
            plus = loss_at(loss_fn, params, seed, self.eps, saved)
            minus = loss_at(loss_fn, params, seed, -self.eps, saved)
            c = (plus - minus) / (2.0 * self.eps)
            seeds.append(seed)
            scalars.append(c)
            losses.append(0.5 * (plus + minus))
            sample = c * direction_vector(params, seed).double()
            total = sample if total is None else total + sample
            sq_norms += float(sample @ sample)
            n = len(seeds)
            if n >= max(2, self.min_queries):
                mean_sq = float((total / n) @ (total / n))
                variance = max(sq_norms - n * mean_sq, 0.0) / (n * (n - 1))
                ratio = variance / max(mean_sq, 1e-30)
                if ratio <= self.threshold:
                    break
        return ZOEstimate(
            seeds,
            scalars,
            sum(losses) / len(losses),
            forward_passes=2 * len(seeds),
            extras={"queries": float(len(seeds)), "relative_variance": ratio},
        )
