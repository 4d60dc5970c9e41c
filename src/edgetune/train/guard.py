"""The divergence guard: a run that goes bad is rolled back and continues more gently.

Zeroth-order training on LoRA can learn for a while and then climb away (a step size that
was stable on one task collapsed below zero-shot on another, and a check of 20x the first
loss never fired). The guard watches three signals after every step and evaluation:

- the step's loss is not finite, or above `train.explode_factor` x the first loss;
- the smoothed training loss (an exponential moving average with a window of
  `train.guard_window` steps) stays above `(1 + train.guard_margin)` x its best for
  `train.guard_window` consecutive steps;
- the held-out headline metric is worse than its best by more than `train.guard_drop`
  of the best (relative; accuracy 0.80 -> below 0.60 at 0.25).

When one fires, the loop restores the last good point (adapter and optimizer state, never
the step counter: steps, batches and seeds keep counting forward) and multiplies the step
size by `train.guard_backoff`, at most `train.guard_rollbacks` times; then it stops as it
always did. A good point is the state at step 0, or at the step where the smoothed loss
last reached a new best, once the next step's loss confirms it healthy: the loss of step s
is measured on the parameters after s - 1 updates, so a snapshot is trusted only once a
step has run on it. (Snapshots taken at evaluation steps instead sent a BBC News run back
to step 0 three times: the loss was already rising at each evaluation.)

Every decision is a pure function of the losses and metrics seen, and the guard's state
(`GuardState`) travels in the checkpoint, so a run resumed across a rollback ends as the
uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from edgetune.train.config import TrainConfig

# Held-out metrics in the order a run's headline is chosen, and whether higher is better.
HEADLINE = (("eval/accuracy", True), ("eval/rougeL", True), ("eval/loss", False))


def headline(metrics: dict[str, float]) -> tuple[str, bool] | None:
    """(key, higher is better) of the metric that ranks evaluations, or None."""
    return next(((k, up) for k, up in HEADLINE if k in metrics), None)


def better(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether evaluation `a` beats `b`: on their headline metric, and on equal headlines
    (accuracy over a few hundred rows ties often) on the lower held-out loss."""
    head = headline(a)
    if head is None or head[0] not in b:
        return False
    key, up = head
    if a[key] != b[key]:
        return a[key] > b[key] if up else a[key] < b[key]
    loss = "eval/loss"
    return loss != key and loss in a and loss in b and a[loss] < b[loss]


@dataclass
class GuardState:
    """What the guard has seen (saved in checkpoints as JSON)."""

    ema: float | None = None  # bias-corrected moving average of the training loss
    ema_raw: float = 0.0
    seen: int = 0  # finite losses averaged into ema
    best_ema: float | None = None
    rising: int = 0  # consecutive steps with ema above the margin
    rollbacks: int = 0
    lr_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> GuardState:
        return cls(**(data or {}))


class Guard:
    """Decides, from losses and evaluations, when a run has gone bad (see module doc)."""

    def __init__(self, cfg: TrainConfig, state: GuardState | None = None):
        self.cfg = cfg
        self.state = state or GuardState()
        self.beta = 1.0 - 2.0 / (cfg.guard_window + 1)  # EMA with a ~window-step memory
        self.improved = False  # the last observed loss set a new best average

    def limit(self, first_loss: float | None) -> float:
        """The loss above which a step counts as exploded (explode_factor x the first)."""
        return self.cfg.explode_factor * max(abs(first_loss or 0.0), 1e-3)

    def exploded(self, loss: float, first_loss: float | None) -> str | None:
        """Why `loss` ends the run at once (non-finite, or explode_factor x the first)."""
        limit = self.limit(first_loss)
        if math.isfinite(loss) and loss <= limit:
            return None
        return f"loss {loss} above {limit:.3g} ({self.cfg.explode_factor:g}x the first loss)"

    def observe_loss(self, loss: float) -> str | None:
        """Fold a finite training loss into the average; the reason to roll back, if any."""
        s = self.state
        self.improved = False
        s.seen += 1
        s.ema_raw = self.beta * s.ema_raw + (1.0 - self.beta) * loss
        s.ema = s.ema_raw / (1.0 - self.beta**s.seen)
        if s.seen < self.cfg.guard_window:  # too few losses for a trustworthy average
            return None
        if s.best_ema is None or s.ema < s.best_ema:
            s.best_ema = s.ema
            self.improved = True
        s.rising = s.rising + 1 if s.ema > (1.0 + self.cfg.guard_margin) * s.best_ema else 0
        if s.rising < self.cfg.guard_window:
            return None
        return (
            f"smoothed loss {s.ema:.4g} above {1 + self.cfg.guard_margin:g}x its best "
            f"{s.best_ema:.4g} for {s.rising} step{'s' if s.rising > 1 else ''}"
        )

    def observe_eval(self, metrics: dict[str, float], best: dict[str, float]) -> str | None:
        """The reason to roll back when evaluation `metrics` fell well below the `best`
        evaluation so far (which may be `metrics` itself)."""
        head = headline(metrics)
        if head is None or head[0] not in best:
            return None
        key, up = head
        drop = (best[key] - metrics[key]) if up else (metrics[key] - best[key])
        if drop <= self.cfg.guard_drop * abs(best[key]):
            return None
        return (
            f"{key} {metrics[key]:.4g} fell more than {self.cfg.guard_drop:g} below its "
            f"best {best[key]:.4g} (step {best.get('step', 0):g})"
        )

    def can_roll_back(self) -> bool:
        return self.cfg.guard and self.state.rollbacks < self.cfg.guard_rollbacks

    def rolled_back(self) -> None:
        """Count a rollback, lower the step size, and forget the bad stretch's averages
        (the restored parameters start a fresh average; the bests are kept)."""
        s = self.state
        self.improved = False
        s.rollbacks += 1
        s.lr_scale *= self.cfg.guard_backoff
        s.ema, s.ema_raw, s.seen, s.rising = None, 0.0, 0, 0
