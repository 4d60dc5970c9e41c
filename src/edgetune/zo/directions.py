"""Random directions z over a list of tensors, regenerated from a seed instead of stored.

A direction is one standard normal tensor per parameter, drawn in parameter order from a
generator seeded with the direction's seed. Because z is a pure function of the seed, the
perturbation theta + scale * z can be applied and undone in place without ever holding z
for more than one parameter at a time: the memory of a ZO step is that of inference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from edgetune.zo.seeds import generator


def iter_direction(params: Sequence[torch.Tensor], seed: int) -> Iterator[torch.Tensor]:
    """Yield z for each parameter in order (each z has its parameter's shape, fp32 on CPU)."""
    gen = generator(seed)
    for p in params:
        z = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        yield z.to(device=p.device, dtype=p.dtype)


@torch.no_grad()
def add_direction(params: Sequence[torch.Tensor], seed: int, scale: float) -> None:
    """theta <- theta + scale * z(seed), in place."""
    for p, z in zip(params, iter_direction(params, seed), strict=True):
        p.add_(z, alpha=scale)


def direction_vector(params: Sequence[torch.Tensor], seed: int) -> torch.Tensor:
    """z(seed) flattened into one vector (for tests and analysis, not for training)."""
    return torch.cat([z.flatten() for z in iter_direction(params, seed)])


def materialize(params: Sequence[torch.Tensor], estimate: Any) -> list[torch.Tensor]:
    """g_hat = (1/q) sum_i c_i z(s_i) as one tensor per parameter (for stateful optimizers).

    Args:
        params: the trainable tensors (only their shapes, dtypes and order are used).
        estimate: a ZOEstimate (seeds, scalars).
    """
    grads = [torch.zeros_like(p) for p in params]
    q = len(estimate.seeds)
    for seed, scalar in zip(estimate.seeds, estimate.scalars, strict=True):
        for g, z in zip(grads, iter_direction(params, seed), strict=True):
            g.add_(z, alpha=scalar / q)
    return grads


@torch.no_grad()
def snapshot(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `params`, for an exact restore after a perturbation."""
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore(params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    """Copy `saved` back into `params` (bit-exact, unlike subtracting the perturbation)."""
    for p, s in zip(params, saved, strict=True):
        p.copy_(s)


def loss_at(
    loss_fn: Callable[[], float],
    params: Sequence[torch.Tensor],
    seed: int,
    scale: float,
    saved: Sequence[torch.Tensor] | None = None,
) -> float:
    """L(theta + scale * z(seed)), perturbing in place and leaving theta as it was.

    Args:
        loss_fn: evaluates the loss at the current params.
        params: the trainable tensors.
        seed: the direction's seed.
        scale: signed step along z (e.g. +eps or -eps).
        saved: a `snapshot` of params for an exact restore; None restores by subtraction
            (exact to fp32 rounding, no extra memory).
    """
    add_direction(params, seed, scale)
    value = loss_fn()
    if saved is not None:
        restore(params, saved)
    else:
        add_direction(params, seed, -scale)
    return value
