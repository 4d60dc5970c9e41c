"""Every incoming update is checked before it can touch the global model.

An update is rejected (and the reason logged by the caller) when its tensors do not match
the global adapter's names, shapes and dtypes, when any value is not finite, when its
norm exceeds the configured bound, or when a ZO trace names a seed outside the pool,
has inconsistent lengths, more steps than a round has, or a learning rate other than
the run's. Rejected updates are never aggregated.

Every comparison is written so that NaN fails it (`not value <= bound`), and every bound
is checked finite and positive before use (`check_bound`): a NaN bound raises instead
of switching a check off.

A client's example count weighs its update in the mean rules, so it must not buy
influence: `cap_examples` cuts a claimed count to what the server knows the client holds.
The simulator knows each client's partition (the job's rows); a Flower server runs the
same `setup` on the same data config and seed as its devices, so it derives the same
seeded partitions and knows each partition id's size too.
"""

from __future__ import annotations

import math

import torch

from edgetune.fed.aggregate import check_bound
from edgetune.fed.payloads import LoraDelta, Payload, SeedTrace, Update, ZOTrace


def check_delta(
    delta: LoraDelta, reference: dict[str, torch.Tensor], max_norm: float | None
) -> str | None:
    """The reason `delta` is invalid against the global tensors `reference`, or None."""
    check_bound("max_update_norm", max_norm)
    if set(delta.tensors) != set(reference):
        missing = sorted(set(reference) - set(delta.tensors))[:2]
        extra = sorted(set(delta.tensors) - set(reference))[:2]
        return f"tensor names differ (missing {missing}, unexpected {extra})"
    total = 0.0
    for name, ref in reference.items():
        value = delta.tensors[name]
        if value.shape != ref.shape or value.dtype != ref.dtype:
            return (
                f"{name}: got {tuple(value.shape)} {value.dtype}, expected "
                f"{tuple(ref.shape)} {ref.dtype}"
            )
        if not torch.isfinite(value).all():
            return f"{name}: non-finite values"
        total += float(value.double().pow(2).sum())
    if not delta.num_examples > 0:
        return f"num_examples must be positive, got {delta.num_examples}"
    norm = math.sqrt(total)
    if max_norm is not None and not norm <= max_norm:
        return f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}"
    return None


def check_trace(
    trace: ZOTrace,
    pool_size: int,
    max_abs_scalar: float | None,
    lr: float | None = None,
    max_steps: int | None = None,
) -> str | None:
    """The reason `trace` is invalid for a pool of `pool_size` seeds, or None.

    Args:
        lr: the run's learning rate; every step must report it (the server decides it).
        max_steps: the local steps of a round; a longer trace is forged.
    """
    check_bound("max_abs_scalar", max_abs_scalar)
    n = len(trace.indices)
    if not n == len(trace.scalars) == len(trace.lrs):
        return "indices, scalars and lrs have different lengths"
    if max_steps is not None and n > max_steps:
        return f"{n} steps in a round of fed.local_steps={max_steps}"
    if any(not 0 <= k < pool_size for k in trace.indices):
        return f"seed index outside the pool of {pool_size}"
    values = [*trace.scalars, *trace.lrs]
    if any(not math.isfinite(v) for v in values):
        return "non-finite scalar or lr"
    if lr is not None:
        allowed = (lr, _float32(lr))  # lrs travel as float32
        if any(x not in allowed for x in trace.lrs):
            bad = next(x for x in trace.lrs if x not in allowed)
            return f"learning rate {bad:.3g} differs from the run's {lr:.3g}"
    elif any(not x >= 0 for x in trace.lrs):
        return "negative learning rate"
    if not trace.num_examples > 0:
        return f"num_examples must be positive, got {trace.num_examples}"
    if max_abs_scalar is not None and any(not abs(s) <= max_abs_scalar for s in trace.scalars):
        return f"a scalar exceeds the bound {max_abs_scalar:.3g}"
    return None


def check_seed_trace(trace: SeedTrace, max_abs_coef: float | None) -> str | None:
    """The reason a `SeedTrace` is invalid, or None."""
    check_bound("max_abs_coef", max_abs_coef)
    if len(trace.seeds) != len(trace.coefs):
        return "seeds and coefficients have different lengths"
    if not trace.seeds:
        return "empty trace"
    if any(not math.isfinite(c) for c in trace.coefs):
        return "non-finite coefficient"
    if not trace.num_examples > 0:
        return f"num_examples must be positive, got {trace.num_examples}"
    if max_abs_coef is not None and any(not abs(c) <= max_abs_coef for c in trace.coefs):
        return f"a coefficient exceeds the bound {max_abs_coef:.3g}"
    return None


def cap_examples(update: Payload, cap: int) -> str | None:
    """Cut `update.num_examples` to `cap` (the rows the server knows the client holds), in
    place; returns a note naming the claim when it was cut, else None."""
    if not isinstance(update, Update):
        return None  # not an update: the algorithm's check rejects it
    claimed = update.num_examples
    if claimed <= cap:
        return None
    update.num_examples = cap
    return f"num_examples {claimed} capped at {cap} (the client's partition)"


def _float32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))
