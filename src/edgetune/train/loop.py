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

from edgetune import console
from edgetune.errors import TrainingDivergedError
from edgetune.peft import Adapter
from edgetune.runs import RunDir
from edgetune.train.checkpoint import good_before_divergence, save_checkpoint
from edgetune.train.config import OptimConfig, TrainConfig
from edgetune.train.sampler import batch_indices
from edgetune.train.schedule import lr_at
from edgetune.train.steps import Stepper


@dataclass
class LoopState:
    """What the loop carries between steps (saved in checkpoints)."""

    step: int = 0
    first_loss: float | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    train_s: float = 0.0  # cumulative step time, evaluation excluded


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
    bar = console.bar(len(rows), "evaluating", "ex", enabled=progress, leave=False)
    try:
        metrics = task.evaluate(model, rows, batch_size, bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
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

    Raises:
        TrainingDivergedError: the loss became non-finite or exploded; checkpoints written
            before that step are kept.
    """
    state = state or LoopState()
    if state.step == 0 and cfg.eval_at_start and eval_rows:
        state.last_eval = evaluate(adapter, task, eval_rows, cfg.eval_batch_size, cfg.progress)
        run.log({"step": 0, **state.last_eval})
    bar = _progress(cfg, state.step)
    for step in range(state.step, cfg.steps):
        rows = [train_rows[i] for i in batch_indices(step, len(train_rows), cfg.batch_size, seed)]
        lr = lr_at(step, cfg.steps, optim.lr or 0.0, optim.schedule, optim.warmup_steps)
        started = time.perf_counter()
        result = stepper.step(rows, step, lr)
        step_s = time.perf_counter() - started
        state.train_s += step_s
        _check_divergence(result.loss, state, cfg, run, step + 1)
        state.step = step + 1
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
        run.log(
            {"step": state.step, "step_s": step_s, "train_s": state.train_s}, file="timing.jsonl"
        )
        if _due(state.step, cfg.eval_every, cfg.steps) and eval_rows:
            state.last_eval = evaluate(adapter, task, eval_rows, cfg.eval_batch_size, cfg.progress)
            run.log({"step": state.step, **state.last_eval})
        if checkpoints and _due(state.step, cfg.checkpoint_every, cfg.steps):
            save_checkpoint(
                run.path,
                state.step,
                adapter.state_dict(),
                stepper.state_dict(),
                {
                    "first_loss": state.first_loss,
                    "last_eval": state.last_eval,
                    "train_s": state.train_s,
                },
                cfg.keep_checkpoints,
            )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(_postfix(result.loss, state.last_eval))
    if bar is not None:
        bar.close()
    return state


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def _check_divergence(loss: float, state: LoopState, cfg: TrainConfig, run: RunDir, step: int):
    if state.first_loss is None and math.isfinite(loss):
        state.first_loss = loss
    limit = cfg.explode_factor * max(abs(state.first_loss or 0.0), 1e-3)
    if math.isfinite(loss) and loss <= limit:
        return
    saved = good_before_divergence(run.path, step)
    where = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint precedes it"
    run.log({"step": step, "loss": loss, "diverged": True})
    raise TrainingDivergedError(
        f"loss {loss} at step {step} (first loss {state.first_loss}, limit {limit:.3g}): "
        f"training diverged; {where}. Lower optim.lr (or zo.eps) and resume with "
        f"--resume {run.path}, or raise train.explode_factor."
    )


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
