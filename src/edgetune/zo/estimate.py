"""The result of a zeroth-order gradient estimate: seeds and scalars, nothing else.

An estimate of the gradient is g_hat = (1/q) * sum_i c_i * z(s_i), where s_i are seeds
and c_i scalars (projected gradients). It is all a receiver needs to rebuild the update,
so it is also what federated ZO algorithms send over the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class ZOEstimate:
    """A gradient estimate as (seeds, scalars).

    Attributes:
        seeds: one seed per direction z_i.
        scalars: the projected gradient c_i for each direction.
        loss: the loss at (or around) the current parameters, for logging.
        forward_passes: how many forward passes the estimate cost.
    """

    seeds: list[int]
    scalars: list[float]
    loss: float
    forward_passes: int = 0
    extras: dict[str, float] = field(default_factory=dict)


LossFn = Callable[[], float]


class Estimator(Protocol):
    """Estimates the gradient of `loss_fn` at the current `params` from forward passes.

    Implementations may perturb `params` in place but must leave them as they found them
    (to fp32 rounding) when they return.
    """

    def estimate(
        self, loss_fn: LossFn, params: list[torch.Tensor], step_seed: int
    ) -> ZOEstimate: ...
