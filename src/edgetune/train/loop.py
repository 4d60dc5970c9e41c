"""The single-device training loop: steps, periodic evaluation, checkpoints, divergence.

`fit` is written once for every method: the stepper decides how a step is computed
(backprop or forward-only ZO); the loop decides which rows it sees (a stateless function
of seed and step), when to evaluate and checkpoint, and when to stop a diverging run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from edgetune import console
from edgetune.errors import ConfigError, TrainingDivergedError
from edgetune.peft import Adapter
from edgetune.runs import RunDir, trim_heap
from edgetune.train.checkpoint import good_before_divergence, save_checkpoint, warn
from edgetune.train.config import OptimConfig, TrainConfig
from edgetune.train.guard import Guard, GuardState, better
from edgetune.train.sampler import batch_indices
from edgetune.train.schedule import lr_at
from edgetune.train.snapshot import Snapshot
from edgetune.train.steps import Stepper


@dataclass
class LoopState:
    """What the loop carries between steps (saved in checkpoints)."""

    step: int = 0
    first_loss: float | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    train_s: float = 0.0  # cumulative step time, evaluation excluded
    guard: GuardState = field(default_factory=GuardState)
    good: Snapshot | None = None  # the rollback target
    pending: Snapshot | None = None  # awaits one healthy step to become `good`
    best: Snapshot | None = None  # the adapter of the best evaluation (train.keep=best)
    best_eval: dict[str, float] = field(default_factory=dict)  # with its "step"
    first_eval: dict[str, float] = field(default_factory=dict)  # the step-0 evaluation

    def to_checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(JSON loop state, tensors for kept.pt)."""
        loop = {
            "first_loss": self.first_loss,
            "last_eval": self.last_eval,
            "train_s": self.train_s,
            "guard": self.guard.to_dict(),
            "pending": self.pending is not None,
            "best_eval": self.best_eval,
            "first_eval": self.first_eval,
        }
        kept = {
            "good": self.good.to_dict() if self.good else None,
            "best": self.best.to_dict() if self.best else None,
        }
        return loop, kept

    @classmethod
    def from_checkpoint(
        cls, adapter: dict[str, torch.Tensor], stepper: dict[str, Any], loop: dict[str, Any]
    ) -> LoopState:
        """The state a checkpoint describes: its state.json, with its kept.pt under "kept"
        (a pending snapshot is always the checkpoint's own adapter and stepper state)."""
        kept = loop.get("kept") or {}
        pending = Snapshot(loop["step"], adapter, stepper) if loop.get("pending") else None
        return cls(
            loop["step"],
            loop.get("first_loss"),
            loop.get("last_eval", {}),
            loop.get("train_s", 0.0),
            GuardState.from_dict(loop.get("guard")),
            Snapshot.from_dict(kept.get("good")),
            pending,
            Snapshot.from_dict(kept.get("best")),
            loop.get("best_eval", {}),
            loop.get("first_eval", {}),
        )


def evaluate(
    adapter: Adapter, task: Any, rows: Sequence[dict], batch_size: int, progress: bool = False
) -> dict:
    """Task metrics with the `eval/` prefix; with `progress`, a bar over the rows (an
    evaluation of a few hundred examples takes tens of seconds on a CPU)."""
    return evaluate_model(adapter.model, task, rows, batch_size, progress)


def evaluate_model(
    model: Any, task: Any, rows: Sequence[dict], batch_size: int, progress: bool = False
) -> dict:
    """`evaluate` for a bare model (no Adapter), e.g. a loaded PEFT adapter."""
    trim_heap()  # the steps' freed buffers, before evaluation allocates its own
    bar = console.bar(len(rows), "evaluating", "ex", enabled=progress, leave=False)
    try:
        metrics = task.evaluate(model, rows, batch_size, bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
        trim_heap()  # and evaluation's, before the steps go on
    return {f"eval/{k}": float(v) for k, v in metrics.items()}


def fit(
    adapter: Adapter,
    task: Any,
    train_rows: Sequence[dict],
    eval_rows: Sequence[dict],
    stepper: Stepper,
    cfg: TrainConfig,
    optim: OptimConfig,
    run: RunDir,
    seed: int,
    state: LoopState | None = None,
    checkpoints: bool = True,
) -> LoopState:
    """Train to `cfg.steps`, starting from `state` (a resumed run) or from scratch;
    `checkpoints=False` writes none (a caller that never resumes, e.g. compress recovery).
    With `train.keep` best (or auto and `eval_rows`), the adapter ends as it was at the
    best evaluation (`state.best`); the divergence guard is `train/guard.py`.

    Raises:
        ConfigError: train.keep=best with no held-out rows to rank adapters by.
        TrainingDivergedError: the loss became non-finite or exploded, or the guard fired
            with no rollback left; checkpoints written before that step are kept.
    """
    keep_best = keeps_best(cfg, eval_rows)
    state = state or LoopState()
    guard = Guard(cfg, state.guard)
    if state.step == 0 and cfg.eval_at_start and eval_rows:
        _evaluate(adapter, task, eval_rows, cfg, run, state, keep_best)
        state.first_eval = dict(state.last_eval)
    if cfg.guard and state.good is None:  # step 0, or a checkpoint from before the guard
        state.good = Snapshot.take(state.step, adapter, stepper)
    bar = _progress(cfg, state.step)
    for step in range(state.step, cfg.steps):
        rows = [train_rows[i] for i in batch_indices(step, len(train_rows), cfg.batch_size, seed)]
        lr = lr_at(step, cfg.steps, optim.lr or 0.0, optim.schedule, optim.warmup_steps)
        lr *= state.guard.lr_scale
        started = time.perf_counter()
        result = stepper.step(rows, step, lr)
        step_s = time.perf_counter() - started
        state.train_s += step_s
        state.step = step + 1
        reason = _check_loss(result.loss, state, guard, run)
        _log_step(run, state, result, lr, step_s)
        if reason is None and state.pending is not None:
            state.good, state.pending = state.pending, None  # a healthy step ran on it
        due_eval = _due(state.step, cfg.eval_every, cfg.steps) and bool(eval_rows)
        if reason is None and due_eval:
            _evaluate(adapter, task, eval_rows, cfg, run, state, keep_best)
            reason = guard.observe_eval(state.last_eval, state.best_eval) if cfg.guard else None
        if reason is not None:
            _roll_back(reason, state, guard, adapter, stepper, run)
            if state.step == cfg.steps and eval_rows:  # the restored state is the result
                _evaluate(adapter, task, eval_rows, cfg, run, state, keep_best)
        due_checkpoint = checkpoints and _due(state.step, cfg.checkpoint_every, cfg.steps)
        if cfg.guard and reason is None and guard.improved:
            state.pending = Snapshot.take(state.step, adapter, stepper)
        if due_checkpoint:
            loop, kept = state.to_checkpoint()
            save_checkpoint(
                run.path,
                state.step,
                adapter.state_dict(),
                stepper.state_dict(),
                loop,
                cfg.keep_checkpoints,
                kept,
            )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(_postfix(result.loss, state.last_eval))
    if bar is not None:
        bar.close()
    if keep_best and state.best is not None and state.best.step != state.step:
        state.best.restore(adapter)
    return state


def keeps_best(cfg: TrainConfig, eval_rows: Sequence[dict]) -> bool:
    """Whether the run's result is its best evaluated adapter (train.keep).

    Raises:
        ConfigError: train.keep=best with no held-out rows to rank adapters by.
    """
    if cfg.keep == "best" and not eval_rows:
        raise ConfigError(
            "train.keep=best needs held-out rows to rank the adapters, and this run has "
            "none: use train.keep=last, or give the data an evaluation split"
        )
    return cfg.keep == "best" or (cfg.keep == "auto" and bool(eval_rows))


def _evaluate(
    adapter: Adapter,
    task: Any,
    rows: Sequence[dict],
    cfg: TrainConfig,
    run: RunDir,
    state: LoopState,
    keep_best: bool,
) -> None:
    """Evaluate, log, and remember the best evaluation (and, for keep=best, its adapter)."""
    state.last_eval = evaluate(adapter, task, rows, cfg.eval_batch_size, cfg.progress)
    run.log({"step": state.step, **state.last_eval})
    if not state.best_eval or better(state.last_eval, state.best_eval):
        state.best_eval = {"step": state.step, **state.last_eval}
        if keep_best:
            state.best = Snapshot.take(state.step, adapter)


def _log_step(run: RunDir, state: LoopState, result: Any, lr: float, step_s: float) -> None:
    extras = result.estimate.extras if result.estimate is not None else {}
    run.log(
        {
            "step": state.step,
            "loss": result.loss,
            "lr": lr,
            **{f"zo/{k}": v for k, v in extras.items()},
        }
    )
    if result.estimate is not None:
        est = result.estimate
        run.log(
            {"step": state.step, "seeds": est.seeds, "scalars": est.scalars, "lr": lr},
            file="trace.jsonl",
        )
    # Wall-clock goes to its own file so metrics.jsonl stays byte-for-byte reproducible.
    run.log({"step": state.step, "step_s": step_s, "train_s": state.train_s}, file="timing.jsonl")


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def _check_loss(loss: float, state: LoopState, guard: Guard, run: RunDir) -> str | None:
    """Why this step's loss calls for a rollback (None: it does not). A loss that
    exploded with no rollback left (or the guard off) ends the run as it always did."""
    if state.first_loss is None and math.isfinite(loss):
        state.first_loss = loss
    exploded = guard.exploded(loss, state.first_loss)
    if exploded is None:
        return guard.observe_loss(loss) if guard.cfg.guard else None
    if guard.can_roll_back():
        return exploded
    limit = guard.limit(state.first_loss)
    run.log({"step": state.step, "loss": loss, "diverged": True})
    raise TrainingDivergedError(
        f"loss {loss} at step {state.step} (first loss {state.first_loss}, limit {limit:.3g}): "
        f"training diverged{_after(guard)}; {_last_good(run, state.step)}. Lower optim.lr "
        f"(or zo.eps) and resume with --resume {run.path}, or raise train.explode_factor."
    )


def _roll_back(
    reason: str, state: LoopState, guard: Guard, adapter: Adapter, stepper: Stepper, run: RunDir
) -> None:
    """Restore the last good point and lower the step size; with no rollback left, stop.

    Raises:
        TrainingDivergedError: no rollback left (or no good point to return to).
    """
    if not guard.can_roll_back() or state.good is None:
        run.log({"step": state.step, "diverged": True, "reason": reason})
        raise TrainingDivergedError(
            f"{reason} at step {state.step}: training diverged{_after(guard)}; "
            f"{_last_good(run, state.step)}. Lower optim.lr (or zo.eps) and resume with "
            f"--resume {run.path}, or turn the guard off (train.guard=false)."
        )
    state.good.restore(adapter, stepper)
    state.pending = None
    guard.rolled_back()
    record = {"to_step": state.good.step, "reason": reason, "lr_scale": guard.state.lr_scale}
    run.log({"step": state.step, "rollback": record})
    warn(
        f"step {state.step}: {reason}; rolled back to step {state.good.step} and lowered "
        f"the step size to {guard.state.lr_scale:g}x (rollback {guard.state.rollbacks} of "
        f"{guard.cfg.guard_rollbacks})"
    )


def _after(guard: Guard) -> str:
    n = guard.state.rollbacks
    return f" after {n} rollback{'s' if n != 1 else ''}" if n else ""


def _last_good(run: RunDir, step: int) -> str:
    saved = good_before_divergence(run.path, step)
    return f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint precedes it"


def _progress(cfg: TrainConfig, start: int) -> Any:
    return console.bar(cfg.steps, f"{cfg.method} steps", "step", cfg.progress, initial=start)


def _postfix(loss: float, last_eval: dict[str, float]) -> dict[str, str]:
    """This step's training loss, and the latest evaluation's headline figure labelled
    as such (for lm the evaluation's own `loss` would otherwise hide the training loss)."""
    post = {"loss": f"{loss:.4f}"}
    for key in ("eval/accuracy", "eval/rougeL", "eval/loss"):
        if key in last_eval:
            post[key.replace("/", "_")] = f"{last_eval[key]:.4f}"
            break
    return post
