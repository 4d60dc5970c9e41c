"""Every incoming update is checked before it can touch the global model.

An update is rejected (and the reason logged by the caller) when its tensors do not match
the global adapter's names, shapes and dtypes, when any value is not finite, when its
norm exceeds the configured bound, or when a ZO trace names a seed outside the pool or
has inconsistent lengths. Rejected updates are never aggregated.
"""

from __future__ import annotations

import math

import torch

from edgetune.fed.payloads import LoraDelta, SeedTrace, ZOTrace


def check_delta(
    delta: LoraDelta, reference: dict[str, torch.Tensor], max_norm: float | None
) -> str | None:
    """The reason `delta` is invalid against the global tensors `reference`, or None."""
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
    if delta.num_examples <= 0:
        return f"num_examples must be positive, got {delta.num_examples}"
    if max_norm is not None and math.sqrt(total) > max_norm:
        return f"update norm {math.sqrt(total):.3g} exceeds the bound {max_norm:.3g}"
    return None


def check_trace(trace: ZOTrace, pool_size: int, max_abs_scalar: float | None) -> str | None:
    """The reason `trace` is invalid for a pool of `pool_size` seeds, or None."""
    n = len(trace.indices)
    if not n == len(trace.scalars) == len(trace.lrs):
        return "indices, scalars and lrs have different lengths"
    if any(not 0 <= k < pool_size for k in trace.indices):
        return f"seed index outside the pool of {pool_size}"
    values = [*trace.scalars, *trace.lrs]
    if any(not math.isfinite(v) for v in values):
        return "non-finite scalar or lr"
    if any(lr < 0 for lr in trace.lrs):
        return "negative learning rate"
    if trace.num_examples <= 0:
        return f"num_examples must be positive, got {trace.num_examples}"
    if max_abs_scalar is not None and any(abs(s) > max_abs_scalar for s in trace.scalars):
        return f"a scalar exceeds the bound {max_abs_scalar:.3g}"
    return None


def check_seed_trace(trace: SeedTrace, max_abs_coef: float | None) -> str | None:
    """The reason a `SeedTrace` is invalid, or None."""
    if len(trace.seeds) != len(trace.coefs):
        return "seeds and coefficients have different lengths"
    if not trace.seeds:
        return "empty trace"
    if any(not math.isfinite(c) for c in trace.coefs):
        return "non-finite coefficient"
    if trace.num_examples <= 0:
        return f"num_examples must be positive, got {trace.num_examples}"
    if max_abs_coef is not None and any(abs(c) > max_abs_coef for c in trace.coefs):
        return f"a coefficient exceeds the bound {max_abs_coef:.3g}"
    return None
