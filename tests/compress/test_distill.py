"""Distillation as a Task wrapper on the real stories260K: the loss mixes as written, the
teacher gets no gradient and runs once per distinct example (once per ZO / P-RGE step
whatever q is), P-RGE's tiled teacher logits give MeZO's step, and the up-front cache
gives the resident teacher's loss."""

from __future__ import annotations

import pytest
import torch

from edgetune import models
from edgetune.compress.distill import DistillTask, TeacherLogits
from edgetune.data import DataConfig, build_task, load_splits
from edgetune.data.tasks import LMTask
from edgetune.peft import PeftConfig, attach
from edgetune.train import PRGEStepper, ZOStepper
from edgetune.zo import MeZOEstimator
from edgetune.zo.config import ZOConfig
from edgetune.zo.optimizers import make_zo_optimizer
from edgetune.zo.prge import PRGEEstimator

TEXTS = [
    "Once upon a time there was a little cat.",
    "The dog ran to the park and played with a ball all day long.",
    "Lily saw a big tree.",
    "Tom and his mom went to the shop to buy some red apples.",
]


@pytest.fixture
def student_teacher(stories260k_path):
    """(a stories260K student with a random nonzero LoRA, the plain model as teacher, tokenizer)."""
    teacher, tokenizer = models.load(str(stories260k_path))
    student = attach(models.load(str(stories260k_path))[0], PeftConfig(rank=4), seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in student.trainable():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return student, teacher.requires_grad_(False), tokenizer


def lm_batch(tokenizer):
    task = LMTask(tokenizer, max_length=64)
    rows = [{"input_ids": tokenizer(t)["input_ids"]} for t in TEXTS]  # ragged: padded
    return task, rows, task.collate(rows)


def sst2_task(tokenizer):
    cfg = DataConfig(dataset="sst2", train_size=16, eval_size=4, max_length=32)
    splits = load_splits(cfg, 0)
    task = build_task(splits, cfg, tokenizer)
    return task, task.prepare_rows(splits.train)


def test_alpha_zero_is_the_task_loss(student_teacher):
    student, teacher, tokenizer = student_teacher
    task, _, batch = lm_batch(tokenizer)
    distill = DistillTask(task, TeacherLogits(task, teacher, keep=8), alpha=0.0, temperature=2.0)
    with torch.no_grad():
        mixed = distill.example_losses(student.model, batch)
        plain = task.example_losses(student.model, batch)
    assert torch.allclose(mixed, plain, atol=1e-6)


@pytest.mark.parametrize("kind", ["lm", "classification"])
def test_kl_is_zero_when_the_student_is_the_teacher(student_teacher, shared_data, kind):
    _, teacher, tokenizer = student_teacher
    if kind == "lm":
        task, _, batch = lm_batch(tokenizer)
    else:
        task, rows = sst2_task(tokenizer)
        batch = task.collate(rows[:4])
    distill = DistillTask(task, TeacherLogits(task, teacher, keep=8), alpha=1.0, temperature=2.0)
    with torch.no_grad():
        found = task.loss_logits(teacher, batch)
        kl = distill.kl(found, distill.teacher.lookup(batch, found.read))
    assert kl.shape == (4,)
    assert kl.abs().max() < 1e-5


def test_fo_gradient_reaches_only_the_students_lora(student_teacher):
    student, teacher, tokenizer = student_teacher
    task, _, batch = lm_batch(tokenizer)
    distill = DistillTask(task, TeacherLogits(task, teacher, keep=8), alpha=0.5, temperature=2.0)
    student.model.train()
    found = distill.loss_logits(student.model, batch)
    with torch.no_grad():
        kl = distill.kl(found, distill.teacher.lookup(batch, found.read))
    found.losses.mean().backward()
    assert (kl > 1e-4).all()
    trainable = {id(p) for p in student.trainable()}
    for p in student.model.parameters():
        assert (p.grad is not None) == (id(p) in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.trainable())
    assert all(p.grad is None for p in teacher.parameters())


def zo_step(student, task, teacher, prge: bool, queries: int):
    store = TeacherLogits(task, teacher, keep=4)
    distill = DistillTask(task, store, alpha=0.5, temperature=2.0)
    optimizer = make_zo_optimizer(ZOConfig(), 0.0)
    if prge:
        estimator = PRGEEstimator(1e-3, queries, True)
        stepper = PRGEStepper(student, distill, estimator, optimizer, 1, seed=0)
    else:
        estimator = MeZOEstimator(1e-3, queries, False, True)
        stepper = ZOStepper(student, distill, estimator, optimizer, 1, seed=0)
    return stepper, store


def test_zo_and_prge_run_the_teacher_once_per_step_and_agree(student_teacher):
    student, teacher, tokenizer = student_teacher
    task, rows, _ = lm_batch(tokenizer)
    start = {n: p.detach().clone() for n, p in student.model.named_parameters()}
    results = {}
    for prge in (False, True):
        student.load_state_dict(start)
        stepper, store = zo_step(student, task, teacher, prge, queries=3)
        first = stepper.step(rows, 0, 1e-3)
        second = stepper.step(rows[::-1][:2] + rows[:2], 1, 1e-3)  # same rows: stored
        third = stepper.step(rows[2:], 2, 1e-3)
        assert store.teacher_calls == 1  # 3 queries x 2 signs x 3 steps, one teacher pass
        results[prge] = [first.estimate.scalars, second.estimate.scalars, third.estimate.scalars]
    # P-RGE tiles the stored logits over its 6 copies: the same scalars as sequential MeZO
    for mezo, prge in zip(results[False], results[True], strict=True):
        assert min(abs(s) for s in mezo) > 0
        assert prge == pytest.approx(mezo, rel=1e-3, abs=1e-4)


def test_new_rows_run_the_teacher_once_more(student_teacher):
    _, teacher, tokenizer = student_teacher
    task, rows, _ = lm_batch(tokenizer)
    store = TeacherLogits(task, teacher, keep=2)
    for first, last, calls in ((0, 2, 1), (1, 3, 2), (1, 3, 2), (0, 1, 3)):
        batch = task.collate(rows[first:last])
        store.lookup(batch, batch["labels"][:, 1:] != -100)
        assert store.teacher_calls == calls  # row 0 was dropped by keep=2, then asked again
        assert len(store.store) == 2


def test_the_up_front_cache_gives_the_resident_teachers_loss(student_teacher, shared_data):
    student, teacher, tokenizer = student_teacher
    task, rows = sst2_task(tokenizer)
    cached = TeacherLogits(task, teacher, keep=None)
    cached.fill(rows, batch_size=1)  # unpadded rows; training batches pad them differently
    cached.teacher = None
    resident = TeacherLogits(task, teacher, keep=8)
    batch = task.collate(rows[3:11])
    with torch.no_grad():
        losses = [
            DistillTask(task, store, 0.7, 3.0).example_losses(student.model, batch)
            for store in (cached, resident)
        ]
    assert cached.teacher_calls == len(rows)
    assert torch.allclose(losses[0], losses[1], atol=1e-4)
