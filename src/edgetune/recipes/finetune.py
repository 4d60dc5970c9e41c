"""`edgetune finetune`: fine-tune one model on one device (first-order or zeroth-order).

setup (model, data, task, adapter, stepper) -> fit -> save adapter and summary. Resuming
reads the run's own config.yaml and its latest checkpoint, drops metric lines logged
after that checkpoint, and continues; the end state equals an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetune import console
from edgetune.config import option, to_dict
from edgetune.data import DataConfig
from edgetune.data.splits import resolved_data
from edgetune.errors import EdgetuneError, TrainingDivergedError
from edgetune.models.builtin import base_model_id
from edgetune.peft import PeftConfig
from edgetune.peft.card import ModelCard
from edgetune.runs import RunDir, peak_rss_mb
from edgetune.train import OptimConfig, TrainConfig
from edgetune.train.config import DEFAULT_LR
from edgetune.zo import ZOConfig


@dataclass
class FinetuneConfig:
    """Everything `edgetune finetune` needs (YAML sections = the nested fields)."""

    model: str = option("smollm2-135m", "built-in name, HF folder, .gguf file or hub id")
    seed: int = option(0, "run seed: data split, batch order, adapter init, ZO directions")
    out: str = option("runs/finetune", "run directory")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    zo: ZOConfig = dataclasses.field(default_factory=ZOConfig)

    def __post_init__(self) -> None:
        if self.optim.lr is None:
            self.optim.lr = DEFAULT_LR[self.train.method]


def setup(cfg: FinetuneConfig) -> dict[str, Any]:
    """Load the model and data and build the adapter, task and stepper."""
    from edgetune import models
    from edgetune.data import build_task, load_splits
    from edgetune.peft import attach

    console.status(f"loading model {cfg.model} and data {cfg.data.dataset}", cfg.train.progress)
    model, tokenizer = models.load(cfg.model)
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
    """The stepper for `cfg.train.method`."""
    from edgetune.peft.adapters import PEFT_FORMAT_METHODS
    from edgetune.train import FirstOrderStepper, PRGEStepper, ZOStepper
    from edgetune.zo import MeZOEstimator
    from edgetune.zo.fwdgrad import ForwardGradientEstimator
    from edgetune.zo.optimizers import make_zo_optimizer
    from edgetune.zo.prge import PRGEEstimator

    if cfg.train.method == "fo":
        return FirstOrderStepper(adapter, task, cfg.optim, cfg.train.grad_accum, cfg.seed)
    if cfg.train.method == "prge":
        prge = PRGEEstimator(cfg.zo.eps, cfg.zo.queries, cfg.zo.parallel_inner)
        optimizer = make_zo_optimizer(cfg.zo, cfg.optim.weight_decay)
        return PRGEStepper(adapter, task, prge, optimizer, cfg.train.grad_accum, cfg.seed)
    exact = str(cfg.zo.exact_restore).lower()
    exact_restore = cfg.peft.method in PEFT_FORMAT_METHODS if exact == "auto" else exact == "true"
    if cfg.zo.estimator == "fwdgrad":
        estimator: Any = ForwardGradientEstimator(
            cfg.zo.eps,
            cfg.zo.queries,
            max(cfg.zo.max_queries, cfg.zo.queries),
            cfg.zo.var_threshold,
            exact_restore=exact_restore,
        )
    else:
        one_sided = cfg.zo.estimator == "one-sided"
        estimator = MeZOEstimator(cfg.zo.eps, cfg.zo.queries, one_sided, exact_restore)
    optimizer = make_zo_optimizer(cfg.zo, cfg.optim.weight_decay)
    return ZOStepper(adapter, task, estimator, optimizer, cfg.train.grad_accum, cfg.seed)


def restore(run: RunDir, parts: dict[str, Any]) -> Any:
    """Load the latest checkpoint into the adapter and stepper; None when there is none."""
    from edgetune.train import LoopState
    from edgetune.train.checkpoint import list_checkpoints, load_checkpoint

    saved = list_checkpoints(run.path)
    step = 0
    state = None
    if saved:
        adapter_state, stepper_state, loop = load_checkpoint(saved[-1])
        parts["adapter"].load_state_dict(adapter_state)
        parts["stepper"].load_state_dict(stepper_state)
        step = loop["step"]
        state = LoopState(
            step, loop.get("first_loss"), loop.get("last_eval", {}), loop.get("train_s", 0.0)
        )
    for file in ("metrics.jsonl", "trace.jsonl", "timing.jsonl"):
        run.truncate_after(step, file=file)
    return state


def run(cfg: FinetuneConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Fine-tune and write the run directory; returns the summary."""
    from edgetune.train import fit

    start = time.perf_counter()
    rundir = RunDir(cfg.out, resume=resume, overwrite=overwrite)
    rundir.write_config(to_dict(cfg))
    parts = setup(cfg)
    cfg = dataclasses.replace(cfg, data=parts["data"])
    rundir.write_config(to_dict(cfg))  # with the labels, verbalizer, template used
    state = restore(rundir, parts) if resume else None
    summary: dict[str, Any] = {
        "command": "finetune",
        "model": cfg.model,
        "method": cfg.train.method,
        "peft": cfg.peft.method,
        "trainable_params": parts["adapter"].num_trainable(),
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
    evals = [r for r in rundir.read_metrics() if any(k.startswith("eval/") for k in r)]
    final = {k: v for k, v in (evals[-1] if evals else {}).items() if k != "step"}
    # Only a step-0 evaluation is the zero-shot baseline (train.eval_at_start).
    initial = [{k: v for k, v in r.items() if k != "step"} for r in evals if r["step"] == 0]
    method = f"edgetune finetune, train.method={cfg.train.method}, {state.step} steps"
    card = ModelCard.for_run(cfg, "finetune", method, final)
    saved = parts["adapter"].save(rundir.path, base_model_id(cfg.model), card)
    summary.update(
        {
            "status": "done",
            "steps": state.step,
            "final_loss": next(
                (r["loss"] for r in reversed(rundir.read_metrics()) if "loss" in r), None
            ),
            **final,
            **({"initial_eval": initial[0]} if initial else {}),
            "saved": str(saved),
            "wall_s": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(),
        }
    )
    rundir.write_summary(summary)
    return summary


def run_in_subprocess(
    out: Path, model: str, args: list[str], quiet: bool = False, command: str = "finetune"
) -> None:
    """`edgetune COMMAND --model MODEL --out OUT --overwrite ARGS` in its own process, so
    its peak memory is its own (used by the demo and the benchmarks).

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
        "--overwrite",
        *args,
    ]
    result = subprocess.run(cmd, capture_output=quiet, text=True)
    if result.returncode != 0:
        detail = (result.stderr or "")[-2000:] if quiet else ""
        raise EdgetuneError(
            f"run {out} failed (exit {result.returncode}): {' '.join(cmd)}\n{detail}"
        )
