"""P-RGE: all 2q perturbed evaluations of a ZO step in one batched forward pass.

Gao et al., "Enabling Resource-Efficient On-Device Fine-Tuning of LLMs Using Only
Inference Engines" (2024). MeZO with q queries runs 2q forward passes one after another.
P-RGE stacks 2q copies of the trainable LoRA tensors,

    copy i     = theta + eps * z_i      (i = 0..q-1, "plus" half)
    copy q + i = theta - eps * z_i      ("minus" half)

repeats the batch 2q times and runs it once (see `edgetune.peft.multicopy`); the per-copy
mean losses give c_i = (L(copy i) - L(copy q+i)) / (2 eps). That is outer-loop (queries)
and inner-loop (+/-) parallelism. With `parallel_inner=False` only the queries run side by
side: one pass over the q plus-copies, one over the q minus-copies.

Our addition: z_i is drawn from a generator seeded with derive(step_seed, i), in the same
parameter order as `MeZOEstimator`, so a P-RGE step is the same (seeds, scalars) record
as a sequential MeZO step with the same seeds (equal to fp32 rounding) and replays with
`apply_estimate`. Copies are rebuilt from theta every step, so they never drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgetune.zo.directions import iter_direction
from edgetune.zo.estimate import ZOEstimate
from edgetune.zo.seeds import derive_seed

# (copies: id(param) -> [C, *param.shape], C) -> mean loss of each copy's slice, shape [C]
CopyLossFn = Callable[[dict[int, torch.Tensor], int], torch.Tensor]


@torch.no_grad()
def build_copies(
    params: list[torch.Tensor], seeds: list[int], eps: float, signs: list[float]
) -> dict[int, torch.Tensor]:
    """Stack copies theta + sign_c * eps * z(seed_c) for each parameter.

    Args:
        params: the trainable tensors (the master copy), in direction order.
        seeds: the seed of each copy's direction (len C).
        eps: perturbation scale.
        signs: +1.0 or -1.0 per copy (len C).

    Returns:
        id(param) -> tensor [C, *param.shape].
    """
    copies = {id(p): p.detach().unsqueeze(0).repeat(len(seeds), *([1] * p.dim())) for p in params}
    done: dict[int, list[torch.Tensor]] = {}
    for c, (seed, sign) in enumerate(zip(seeds, signs, strict=True)):
        if seed not in done:  # z(seed) is drawn once and used by its + and - copies
            done[seed] = list(iter_direction(params, seed))
        for p, z in zip(params, done[seed], strict=True):
            copies[id(p)][c].add_(z, alpha=sign * eps)
    return copies


@dataclass
class PRGEEstimator:
    """Parallel randomized gradient estimate over stacked adapter copies.

    Attributes:
        eps: perturbation scale.
        queries: q directions per step.
        parallel_inner: run +eps and -eps copies in the same pass (2q copies, one pass);
            False runs the q plus-copies, then the q minus-copies (two passes).
    """

    eps: float = 1e-3
    queries: int = 1
    parallel_inner: bool = True

    def estimate(
        self, copy_losses: CopyLossFn, params: list[torch.Tensor], step_seed: int
    ) -> ZOEstimate:
        """Estimate the gradient at `params` (which are left untouched)."""
        q = self.queries
        seeds = [derive_seed(step_seed, i) for i in range(q)]
        if self.parallel_inner:
            copies = build_copies(params, seeds + seeds, self.eps, [1.0] * q + [-1.0] * q)
            losses = copy_losses(copies, 2 * q)
            del copies
            plus, minus = losses[:q], losses[q:]
            passes = 1
        else:
            plus = copy_losses(build_copies(params, seeds, self.eps, [1.0] * q), q)
            minus = copy_losses(build_copies(params, seeds, self.eps, [-1.0] * q), q)
            passes = 2
        scalars = ((plus.double() - minus.double()) / (2.0 * self.eps)).tolist()
        loss = float(0.5 * (plus.double() + minus.double()).mean())
        return ZOEstimate(seeds, scalars, loss, forward_passes=passes)
