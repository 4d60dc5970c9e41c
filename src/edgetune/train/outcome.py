"""What a training run ends with: which adapter was kept, its held-out figures beside the
last evaluation's, and a warning when the run ended worse than it started.

The saved adapter is the result, so the summary's `eval/*` values are the kept adapter's:
with `train.keep=best` the best evaluation's (the step it came from is `kept.step`), with
`last` the last one's. `last_eval` always holds the last evaluation, and `initial_eval`
the one before training. A run whose last evaluation is below its first says so on screen
and in `warnings`, whichever adapter it keeps.
"""

from __future__ import annotations

from typing import Any

from edgetune import console
from edgetune.train.checkpoint import warn
from edgetune.train.guard import headline
from edgetune.train.loop import LoopState

ADVICE = (
    "try a smaller step size (--lr), fewer trainable blocks (peft.layers=top:K), or "
    "first-order training (--method fo) where the device can afford it"
)


def outcome(state: LoopState, keep_best: bool) -> dict[str, Any]:
    """Summary fields for a finished `fit` (see the module docstring)."""
    kept_eval = state.best_eval if keep_best and state.best_eval else state.last_eval
    kept_step = kept_eval.get("step", state.step) if keep_best and state.best_eval else state.step
    fields: dict[str, Any] = {
        **{k: v for k, v in kept_eval.items() if k != "step"},
        "kept": {"policy": "best" if keep_best else "last", "step": kept_step},
        "rollbacks": state.guard.rollbacks,
        "lr_scale": state.guard.lr_scale,
    }
    if state.last_eval:
        fields["last_eval"] = {"step": state.step, **state.last_eval}
    if state.first_eval:
        fields["initial_eval"] = dict(state.first_eval)
    warning = ended_worse(state, kept_step)
    if warning:
        fields["warnings"] = [warning]
    return fields


def ended_worse(state: LoopState, kept_step: int) -> str | None:
    """The warning for a last evaluation below the one before training, or None."""
    first, last = state.first_eval, state.last_eval
    head = headline(last)
    if not first or head is None or head[0] not in first:
        return None
    key, up = head
    if not (last[key] < first[key] if up else last[key] > first[key]):
        return None
    kept = (
        f"the adapter of step {kept_step} ({key} {state.best_eval[key]:.4g}) is kept as the result"
        if kept_step != state.step
        else "the last adapter is kept (train.keep=last)"
    )
    return (
        f"the last evaluation ({key} {last[key]:.4g} at step {state.step}) is below the "
        f"one before training ({first[key]:.4g}); {kept}. To do better, {ADVICE}"
    )


def report_outcome(fields: dict[str, Any], progress: bool) -> None:
    """On screen: which step's adapter was kept and its headline beside the last one's,
    and the warning of a run that ended worse than it started (shown even when quiet)."""
    last = fields.get("last_eval", {})
    head = headline(last)
    kept = fields["kept"]
    if head is not None and kept["step"] != last.get("step"):
        key = head[0]
        console.status(
            f"kept the adapter of step {kept['step']} ({key} {fields[key]:.4g}); the last "
            f"step, {last['step']}, scored {last[key]:.4g}",
            progress,
        )
    for warning in fields.get("warnings", []):
        warn(warning)
