"""The `Task` Protocol: what the training loop needs from a task, and nothing more.

A task turns normalised rows (see `edgetune.data.normalize`) into tensors, gives one
loss per example, and scores a model. The loop always calls, in order:
`rows = task.prepare_rows(rows)` once per split, then per step
`task.example_losses(model, task.collate(batch_rows)).mean()`, and
`task.evaluate(model, eval_rows, batch_size)` for metrics (prefixed "eval/" by the caller).
Per-example losses are independent of the other rows in the batch (padding is masked),
so a batch repeated 2q times for P-RGE can be cut into slices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class LossLogits:
    """One forward pass's per-example losses and the logits those losses read.

    Distillation (`edgetune.compress.distill`) compares the student's and the teacher's
    full-vocabulary distributions at exactly these positions, from the same pass.

    Attributes:
        losses: per-example task loss, [B] fp32, differentiable.
        logits: next-token logits at the positions the loss reads, [B, P, V] fp32
            (classification: P = 1, the last prompt position; lm / instruction: P = T - 1).
        read: which of the P positions count for each example, [B, P] bool (padding and
            prompt tokens of an instruction are False).
    """

    losses: torch.Tensor
    logits: torch.Tensor
    read: torch.Tensor


class Task(Protocol):
    """A classification, instruction or language-modelling task bound to a tokenizer."""

    name: str

    def prepare_rows(self, rows: Sequence[dict]) -> list[dict]:
        """Rows in the form `collate` takes (lm: token blocks; other tasks: unchanged)."""
        ...

    def collate(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        """A CPU batch with at least `input_ids` and `attention_mask` [B, T]."""
        ...

    def example_losses(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Per-example mean loss, shape [B], fp32, differentiable."""
        ...

    def loss_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossLogits:
        """`example_losses` and the logits it read, from one forward pass."""
        ...

    def evaluate(
        self,
        model: torch.nn.Module,
        rows: Sequence[dict],
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> dict[str, float]:
        """Metrics without the "eval/" prefix, under no_grad and eval mode (restored);
        `on_batch(rows_done)` is called after each batch (for a progress bar)."""
        ...


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for the block; the model's previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def batches(
    rows: Sequence[dict], batch_size: int, on_batch: Callable[[int], None] | None = None
) -> Iterator[Sequence[dict]]:
    """Consecutive chunks of `rows` of at most `batch_size` (the last may be shorter);
    `on_batch(len(chunk))` runs once the caller is done with each chunk."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        yield chunk
        if on_batch is not None:
            on_batch(len(chunk))
