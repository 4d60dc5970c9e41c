"""The recovery stage of `edgetune compress`: train a LoRA adapter on the pruned model.

Pruning costs accuracy; a few steps of LoRA on the pruned model win much of it back
(LLM-Pruner's recovery). The steps are those of `edgetune finetune` (`make_stepper`:
first-order, MeZO or P-RGE) run by the same loop (`train.fit`), so step lines
({"step", "loss", "lr"}) join the stage lines in metrics.jsonl; no checkpoints are
written (compress does not resume) and the loop evaluates nothing (compress logs its
"after-recover" stage itself). With `distill`, the loss is mixed with the KL divergence
to a teacher's distribution (`compress.distill.DistillTask`): by default the unpruned
model with its adapter. When the user gave an adapter, recovery continues from the
adapter mapped onto the pruned model instead of a fresh LoRA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from edgetune import console, models
from edgetune.compress.distill import DistillTask, TeacherLogits
from edgetune.config import check_choice, check_positive, option, to_dict
from edgetune.errors import ConfigError, TrainingDivergedError
from edgetune.peft import Adapter, PeftConfig, attach
from edgetune.recipes.finetune import FinetuneConfig, make_stepper
from edgetune.runs import RunDir, reset_peak_rss, status_mb
from edgetune.train import OptimConfig, TrainConfig
from edgetune.train.config import RECIPE_LR, backpropagates, resolve_step_size
from edgetune.train.loop import fit
from edgetune.zo import ZOConfig
from edgetune.zo.config import ZO_SCALES

RECOVER_METHODS = ("none", "fo", "zo", "prge")
ZO_ONLY = ("eps", "queries", "scale")
DISTILL_ONLY = ("teacher", "alpha", "temperature", "teacher_cache")


@dataclass
class RecoverConfig:
    """Recovery training after pruning (recover.* keys); method none skips the stage."""

    method: str = option(
        "none", "none | fo (backprop) | zo (MeZO) | prge (P-RGE)", flag="--recover"
    )
    steps: int = option(100, "recovery optimizer steps", flag="--recover-steps")
    batch_size: int = option(8, "training examples per step")
    lr: float | None = option(
        None,
        "learning rate (default, as edgetune finetune: 1e-3 for fo; for zo / prge the "
        f"default ZO recipe, {RECIPE_LR:g} with recover.scale=rms)",
    )
    rank: int = option(8, "rank of a fresh LoRA adapter (scale alpha = 2 x rank)")
    eps: float = option(1e-3, "zo / prge: perturbation scale epsilon")
    queries: int = option(1, "zo / prge: directions q averaged per step")
    scale: str = option(
        "auto",
        "zo / prge: divide each step's projected gradients by their running RMS: rms | none "
        "| auto (rms when recover.lr is not given: the default ZO recipe)",
    )
    distill: bool = option(
        False, "mix the task loss with KL to a teacher's distribution", flag="--distill"
    )
    teacher: str = option(
        "", "teacher model (default: the unpruned --model with its --adapter)", flag="--teacher"
    )
    alpha: float = option(0.5, "weight of the distillation term, in [0, 1]")
    temperature: float = option(2.0, "softmax temperature of teacher and student, > 0")
    teacher_cache: bool = option(
        False, "teacher logits of every training row computed up front, then the teacher freed"
    )

    def __post_init__(self) -> None:
        check_choice("recover", "method", self.method, RECOVER_METHODS)
        given = [f.name for f in fields(self) if getattr(self, f.name) != f.default]
        if self.method == "none" and given:
            raise ConfigError(
                f"recover.{given[0]}={getattr(self, given[0])!r} is not used without recovery "
                f"(recover.method=none); add --recover fo|zo|prge, or drop it"
            )
        for name in ("steps", "batch_size", "rank", "eps", "queries", "temperature"):
            check_positive("recover", name, getattr(self, name))
        if self.lr is not None:
            check_positive("recover", "lr", self.lr)
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"recover.alpha: expected a value in [0, 1], got {self.alpha!r}")
        _refuse_unread(
            given, ZO_ONLY, backpropagates(self.method), "recover.method=fo", "--recover zo"
        )
        _refuse_unread(given, DISTILL_ONLY, not self.distill, "no --distill", "--distill")
        check_choice("recover", "scale", self.scale, ZO_SCALES)
        if self.method != "none":  # the step size finetune would take (its ZO recipe)
            optim, zo = OptimConfig(lr=self.lr), ZOConfig(scale=self.scale)
            resolve_step_size(optim, zo, self.method)
            self.lr, self.scale = optim.lr, zo.scale


def _refuse_unread(given: list[str], names: tuple, unread: bool, why: str, fix: str) -> None:
    for name in names:
        if unread and name in given:
            raise ConfigError(f"recover.{name} is not used with {why}; add {fix}, or drop it")


def load_teacher(cfg: RecoverConfig, tokenizer: Any, vocab_size: int) -> torch.nn.Module:
    """The teacher named by `cfg.teacher`, frozen; its vocabulary must be the student's.

    Raises:
        ConfigError: the teacher's tokenizer or output size differs from the student's.
    """
    teacher, teacher_tokenizer = models.load(cfg.teacher)
    size = teacher.config.vocab_size
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab() or size != vocab_size:
        raise ConfigError(
            f"recover.teacher={cfg.teacher} has another vocabulary ({len(teacher_tokenizer)} "
            f"tokens, {size} logits) than the student ({len(tokenizer)} tokens, {vocab_size} "
            "logits); distillation compares the two distributions token by token, so pass "
            "a --teacher with the student's tokenizer, or drop --teacher"
        )
    return teacher.requires_grad_(False)


def teacher_logits(
    cfg: RecoverConfig, teacher: torch.nn.Module, task: Any, train_rows: list[dict]
) -> TeacherLogits:
    """The teacher's logits store: per step (the teacher stays resident) or, with
    teacher_cache, every training row up front (the store no longer holds the teacher)."""
    if not cfg.teacher_cache:
        return TeacherLogits(task, teacher, keep=cfg.batch_size)
    store = TeacherLogits(task, teacher, keep=None)
    store.fill(train_rows, cfg.batch_size)
    store.teacher = None
    return store


def recover(
    model: torch.nn.Module,
    adapter_dir: Path | None,
    store: TeacherLogits | None,
    task: Any,
    train_rows: list[dict],
    run: RunDir,
    cfg: RecoverConfig,
    seed: int,
    progress: bool,
) -> tuple[Adapter, dict[str, Any]]:
    """Train the adapter for `cfg.steps` and save it to run/adapter.

    Args:
        model: the pruned model, bare.
        adapter_dir: the mapped adapter to continue from, or None for a fresh LoRA.
        store: the teacher's logits (None = no distillation).

    Returns:
        The trained adapter and the stage's summary (settings, steps, time, memory).
    """
    start = time.perf_counter()
    reset_peak_rss()
    adapter = _trainable(model, adapter_dir, cfg, seed)
    train_task = task if store is None else DistillTask(task, store, cfg.alpha, cfg.temperature)
    finetune = FinetuneConfig(
        seed=seed,
        peft=PeftConfig(rank=cfg.rank, alpha=2.0 * cfg.rank),
        train=TrainConfig(method=cfg.method),
        optim=OptimConfig(lr=cfg.lr),
        zo=ZOConfig(eps=cfg.eps, queries=cfg.queries, scale=cfg.scale)
        if not backpropagates(cfg.method)
        else ZOConfig(),
    )
    stepper = make_stepper(finetune, adapter, train_task)
    loop = TrainConfig(
        method=cfg.method,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        eval_every=0,
        eval_at_start=False,
        # recovery has no held-out rows to judge by and no checkpoints to resume: a
        # diverging loss stops it with recover.lr's fix, as before the guard
        guard=False,
        progress=progress,
    )
    console.status(f"recovering: {cfg.steps} {cfg.method} steps", progress)
    try:
        state = fit(
            adapter,
            train_task,
            train_rows,
            [],
            stepper,
            loop,
            finetune.optim,
            run,
            seed,
            checkpoints=False,
        )
    except TrainingDivergedError as exc:  # fit's advice (--resume) is finetune's
        raise TrainingDivergedError(
            f"recovery diverged: {str(exc).split('; ')[0]}; lower recover.lr (now {cfg.lr})"
            f"{' or recover.eps' if cfg.method != 'fo' else ''} and run compress again"
        ) from None
    adapter.save(run.path, base_model=str(run.path / "model"))
    return adapter, {
        **to_dict(cfg),
        "continued_from": str(adapter_dir) if adapter_dir else None,
        "trainable_params": adapter.num_trainable(),
        "steps_done": state.step,
        "first_loss": state.first_loss,
        "train_s": state.train_s,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": status_mb("VmHWM"),
        "teacher_forward_passes": store.teacher_calls if store is not None else 0,
        "teacher_logits_mb": store.megabytes if store is not None else 0.0,
    }


def _trainable(
    model: torch.nn.Module, adapter_dir: Path | None, cfg: RecoverConfig, seed: int
) -> Adapter:
    """A fresh LoRA adapter on `model`, or the mapped one at `adapter_dir` made trainable."""
    from peft import PeftModel

    if adapter_dir is None:
        return attach(model, PeftConfig(rank=cfg.rank, alpha=2.0 * cfg.rank), seed)
    wrapped = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    return Adapter(wrapped, "lora", names)
