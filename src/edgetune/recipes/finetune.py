"""`edgetune finetune`: fine-tune one model on one device (first-order or zeroth-order).

setup (model, data, task, adapter, stepper) -> fit -> save adapter and summary. Resuming
reads the run's own config.yaml and its newest intact checkpoint, drops metric lines
logged after that checkpoint, and continues in the same folder; the end state equals an
uninterrupted run's. Only RESUME_MAY_CHANGE settings may differ on resume.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetune import console, threads, track
from edgetune.config import build, config_diff, option, to_dict
from edgetune.data import DataConfig
from edgetune.data.splits import resolved_data
from edgetune.errors import ConfigError, EdgetuneError, TrainingDivergedError
from edgetune.models.builtin import base_model_id
from edgetune.peft import PeftConfig
from edgetune.peft.card import ModelCard
from edgetune.runs import RunDir, peak_rss_mb
from edgetune.train import LoopState, OptimConfig, TrainConfig
from edgetune.train.checkpoint import (
    CheckpointError,
    check_saved_rank,
    checkpoint_dir,
    checkpoint_step,
    list_checkpoints,
    newest_intact,
    warn,
)
from edgetune.train.config import AUTO, check_optim_read_by, resolve_step_size
from edgetune.train.factory import check_zo_read
from edgetune.train.loop import keeps_best
from edgetune.train.outcome import outcome, report_outcome
from edgetune.zo import ZOConfig


@dataclass
class FinetuneConfig:
    """Everything `edgetune finetune` needs (YAML sections = the nested fields)."""

    model: str = option(
        "smollm2-135m", "built-in name, HF folder, .gguf file or hub id", flag="--model"
    )
    seed: int = option(
        0, "run seed: data split, batch order, adapter init, ZO directions", flag="--seed"
    )
    out: str = option("runs/finetune", "run directory", flag="--out")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    zo: ZOConfig = dataclasses.field(default_factory=ZOConfig)
    threads: int = option(
        0, "torch threads per process (0 = chosen at start from the free cores and recorded)"
    )
    report_to: str = track.report_to_option()

    def __post_init__(self) -> None:
        threads.check(self.threads, "threads")
        track.names(self.report_to)  # an unknown tracker fails here, with the closest
        if self.train.method != AUTO:  # auto: checked once the method is chosen
            check_method_settings(self)


def check_method_settings(cfg: FinetuneConfig) -> None:
    """Refuse the zo and optim settings the method would not read; fill in its step size."""
    check_zo_read(cfg.train.method, cfg.zo)
    check_optim_read_by(cfg.optim, cfg.train.method)
    resolve_step_size(cfg.optim, cfg.zo, cfg.train.method)


def choose_method(cfg: FinetuneConfig, model: Any) -> None:
    """train.method=auto: set `cfg.train.method` to the first of fo, prge, zo whose
    estimated peak (`train/memory.py`) fits train.memory_mb or this machine's available
    memory, say which and why, and check the settings against it.

    Raises:
        ConfigError: nothing fits (with each method's estimate and the fix).
    """
    import psutil

    from edgetune.train.memory import AUTO_ORDER, affordable, backprop_share, method_memory_mb

    budget = cfg.train.memory_mb or psutil.virtual_memory().available / 2**20
    where = "train.memory_mb" if cfg.train.memory_mb else "available now"
    params = sum(p.numel() for p in model.parameters())
    share = backprop_share(cfg.peft, model)
    estimates = {m: method_memory_mb(params, m, share) for m in AUTO_ORDER}
    chosen = affordable(params, budget, share)
    listed = ", ".join(f"{m} ~{mb:.0f} MB" for m, mb in estimates.items())
    if chosen is None:
        raise ConfigError(
            f"train.method=auto: no method fits {budget:.0f} MB ({where}); estimated peaks: "
            f"{listed}. Raise train.memory_mb, free memory, or train fewer blocks "
            "(peft.layers=top:K lowers first-order's peak)"
        )
    cfg.train.method = chosen
    console.status(
        f"train.method=auto chose {chosen}: estimated peaks {listed}; budget {budget:.0f} MB "
        f"({where})",
        cfg.train.progress,
    )
    check_method_settings(cfg)


def setup(cfg: FinetuneConfig) -> dict[str, Any]:
    """Load the model and data and build the adapter, task and stepper."""
    from edgetune import models
    from edgetune.data import build_task, load_splits
    from edgetune.peft import attach

    console.status(f"loading model {cfg.model} and data {cfg.data.dataset}", cfg.train.progress)
    model, tokenizer = models.load(cfg.model)
    if cfg.train.method == AUTO:  # recorded in config.yaml as the method chosen
        choose_method(cfg, model)
    splits = load_splits(cfg.data, cfg.seed)
    task = build_task(splits, cfg.data, tokenizer)
    adapter = attach(model, cfg.peft, seed=cfg.seed)
    return {
        "data": resolved_data(cfg.data, splits),
        "tokenizer": tokenizer,
        "task": task,
        "adapter": adapter,
        "train_rows": task.prepare_rows(splits.train),
        "eval_rows": task.prepare_rows(splits.eval),
        "stepper": make_stepper(cfg, adapter, task),
    }


def make_stepper(cfg: FinetuneConfig, adapter: Any, task: Any) -> Any:
    """The stepper for `cfg.train.method` (`train/factory.py`)."""
    from edgetune.peft.adapters import PEFT_FORMAT_METHODS
    from edgetune.train.factory import build_stepper

    exact = str(cfg.zo.exact_restore).lower()
    exact_restore = cfg.peft.method in PEFT_FORMAT_METHODS if exact == "auto" else exact == "true"
    return build_stepper(
        cfg.train.method,
        adapter,
        task,
        cfg.optim,
        cfg.zo,
        cfg.train.grad_accum,
        cfg.seed,
        exact_restore=exact_restore,
        trunk=cfg.train.trunk,
    )


# What `finetune --resume` may change: the length of the run (a constant learning rate
# keeps every step taken valid), evaluation / checkpoint cadence and display, and the
# step size (optim.lr, zo.eps) that the divergence error tells the user to lower, and the
# thread count (the machine may be busier now), and the trackers (rebuilt from
# metrics.jsonl on every start). All else shaped the steps already taken (data, model,
# adapter, seed, method, batch, schedule).
RESUME_MAY_CHANGE = (
    "threads",
    "report_to",
    "train.steps",
    "train.eval_every",
    "train.eval_at_start",
    "train.eval_batch_size",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.explode_factor",
    "train.progress",
    "optim.lr",
    "zo.eps",
)


@dataclass
class ResumePoint:
    """Where a resumed run continues: a verified checkpoint (None = from step 0), the
    newer checkpoints to drop (damaged, or holding parameters that diverged), and the
    settings changed on this resume."""

    checkpoint: tuple[dict, dict, dict] | None
    broken: list[Path]
    changed: dict[str, tuple[Any, Any]]
    diverged: list[Path]

    @property
    def step(self) -> int:
        return self.checkpoint[2]["step"] if self.checkpoint else 0


def resume_point(run: RunDir, cfg: FinetuneConfig) -> ResumePoint:
    """Choose the checkpoint to continue from and check that the changed settings fit it.
    Writes nothing, so a refused resume leaves the run as it was.

    Raises:
        ConfigError: train.steps changed under a decaying schedule, or below the steps done.
        CheckpointError: the run trained past its first checkpoint but none is intact.
    """
    saved = build(FinetuneConfig, run.read_config())
    changed = {k: v for k, v in config_diff(saved, cfg).items() if k != "out"}
    # a diverged run: the checkpoint before the diverging step already holds the
    # parameters whose loss diverged (see good_before_divergence)
    diverged_at = [r["step"] for r in run.read_metrics() if r.get("diverged")]
    up_to = diverged_at[-1] - 2 if diverged_at else None
    diverged = [
        p for p in list_checkpoints(run.path) if up_to is not None and checkpoint_step(p) > up_to
    ]
    checkpoint, broken = newest_intact(run.path, up_to)
    if checkpoint is not None:
        where = checkpoint_dir(run.path, checkpoint[2]["step"])
        check_saved_rank(checkpoint[0], cfg.peft, where, run.path / "config.yaml")
    point = ResumePoint(checkpoint, broken, changed, diverged)
    if checkpoint is None:
        _check_nothing_lost(run, saved.train, broken, up_to)
    if "train.steps" in changed and cfg.optim.schedule != "constant":
        raise ConfigError(
            f"train.steps cannot change on --resume with optim.schedule={cfg.optim.schedule}: "
            f"the steps taken followed a learning rate that decays over train.steps="
            f"{saved.train.steps}, so the result would match no run of either length. Keep "
            f"train.steps={saved.train.steps}, or start a new run with --out"
        )
    if cfg.train.steps < point.step:
        raise ConfigError(
            f"train.steps={cfg.train.steps} is below the {point.step} steps {run.path} has "
            f"already trained; on --resume train.steps must be at least {point.step}"
        )
    return point


def _check_nothing_lost(
    run: RunDir, train: TrainConfig, broken: list[Path], up_to: int | None
) -> None:
    """With no intact checkpoint, starting over is fine only if no checkpoint was due
    within the steps worth keeping (those before a divergence, `up_to`)."""
    trained = max((r["step"] for r in run.read_metrics() if "loss" in r), default=0)
    trained = trained if up_to is None else max(0, min(trained, up_to))
    first_due = min(train.checkpoint_every or train.steps, train.steps)
    if broken or trained > first_due:
        where = "every checkpoint is broken" if broken else "checkpoints/ holds none"
        raise CheckpointError(
            f"cannot resume {run.path}: it trained {trained} steps but {where}. Start it "
            f"over with `edgetune finetune --config {run.path / 'config.yaml'} --out "
            f"{run.path} --overwrite`"
        )
    if run.metrics_path.exists():
        warn(
            f"{run.path} holds no checkpoint yet (the first is due at step {first_due}); "
            "it starts again from step 0"
        )


def begin_resume(run: RunDir, point: ResumePoint) -> None:
    """Record this resume in resumes.jsonl, then drop the damaged checkpoints and the log
    lines after the restored step (metrics.jsonl stays as an uninterrupted run's)."""
    if point.diverged:
        names = ", ".join(p.name for p in point.diverged)
        warn(f"{names} of {run.path} hold the parameters whose loss diverged; dropped")
    dropped = [*point.broken, *point.diverged]
    for path in [*dropped, *(run.path / "checkpoints").glob("*.tmp")]:
        shutil.rmtree(path, ignore_errors=True)  # damaged, diverged, or a save cut short
    if point.checkpoint and dropped:
        warn(f"resuming {run.path} from step {point.step}, the newest good checkpoint")
    # first, while timing.jsonl still holds the interrupted call's last line
    run.log_resume({"step": point.step}, [p.name for p in dropped], point.changed)
    for file in ("metrics.jsonl", "trace.jsonl", "timing.jsonl"):
        # with no checkpoint even the step-0 evaluation is redone, so drop it too
        run.truncate_after(point.step if point.checkpoint else -1, file=file)


def restore(point: ResumePoint, parts: dict[str, Any]) -> Any:
    """Load the chosen checkpoint into the adapter and stepper; the LoopState to continue
    from (None to start from step 0)."""
    if point.checkpoint is None:
        return None
    adapter_state, stepper_state, loop = point.checkpoint
    parts["adapter"].load_state_dict(adapter_state)
    parts["stepper"].load_state_dict(stepper_state)
    return LoopState.from_checkpoint(adapter_state, stepper_state, loop)


def run(cfg: FinetuneConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Fine-tune and write the run directory; returns the summary."""
    from edgetune.train import fit

    start = time.perf_counter()
    track.require(cfg.report_to)  # a missing tracker package stops here, before any work
    rundir = RunDir(cfg.out, resume=resume, overwrite=overwrite)
    point = resume_point(rundir, cfg) if resume else None
    if point is not None:
        begin_resume(rundir, point)
    rundir.write_config(to_dict(cfg))
    parts = setup(cfg)
    cfg = dataclasses.replace(cfg, data=parts["data"])
    rundir.write_config(to_dict(cfg))  # with the labels, verbalizer, template used
    state = restore(point, parts) if point is not None else None
    rundir.track(cfg.report_to, to_dict(cfg))
    summary: dict[str, Any] = {
        "command": "finetune",
        "model": cfg.model,
        "method": cfg.train.method,
        "peft": cfg.peft.method,
        "trainable_params": parts["adapter"].num_trainable(),
        "trunk_blocks": parts["stepper"].trunk.cut,  # bottom blocks run once per batch
        "train_examples": len(parts["train_rows"]),
        "eval_examples": len(parts["eval_rows"]),
    }
    try:
        state = fit(
            parts["adapter"],
            parts["task"],
            parts["train_rows"],
            parts["eval_rows"],
            parts["stepper"],
            cfg.train,
            cfg.optim,
            rundir,
            cfg.seed,
            state,
        )
    except TrainingDivergedError as exc:
        rundir.write_summary(
            {
                **summary,
                "status": "diverged",
                "error": str(exc),
                "wall_s": time.perf_counter() - start,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
        raise
    result = outcome(state, keeps_best(cfg.train, parts["eval_rows"]))
    final = {k: v for k, v in result.items() if k.startswith("eval/")}
    method = f"edgetune finetune, train.method={cfg.train.method}, {state.step} steps"
    card = ModelCard.for_run(cfg, "finetune", method, final)
    saved = parts["adapter"].save(rundir.path, base_model_id(cfg.model), card)
    report_outcome(result, cfg.train.progress)
    summary.update(
        {
            "status": "done",
            "steps": state.step,
            "final_loss": next(
                (r["loss"] for r in reversed(rundir.read_metrics()) if "loss" in r), None
            ),
            **result,
            "saved": str(saved),
            "wall_s": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(),
        }
    )
    rundir.write_summary(summary)
    return summary


def run_in_subprocess(
    out: Path,
    model: str,
    args: list[str],
    quiet: bool = False,
    command: str = "finetune",
    overwrite: bool = True,
) -> None:
    """`edgetune COMMAND --model MODEL --out OUT --overwrite ARGS` in its own process, so
    its peak memory is its own (used by the demo and the benchmarks). `overwrite=False`
    for commands that never replace a run (compress, eval): no --overwrite is passed.

    Raises:
        EdgetuneError: the run failed (its stderr is shown unless `quiet` hid it).
    """
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "edgetune.cli",
        command,
        "--model",
        model,
        "--out",
        str(out),
        *(["--overwrite"] if overwrite else []),
        *args,
    ]
    result = subprocess.run(cmd, capture_output=quiet, text=True)
    if result.returncode != 0:
        detail = (result.stderr or "")[-2000:] if quiet else ""
        raise EdgetuneError(
            f"run {out} failed (exit {result.returncode}): {' '.join(cmd)}\n{detail}"
        )
