"""Knowledge distillation as a Task wrapper: the pruned student learns the teacher's logits.

Hinton et al., "Distilling the Knowledge in a Neural Network" (2015). Per example:

    L = (1 - alpha) * L_task + alpha * T^2 * mean_p KL(softmax(t_p / T) || softmax(s_p / T))

over the positions p the task's loss reads (classification: the last prompt position;
lm / instruction: the label positions), full vocabulary; s_p, t_p: [V] student and
teacher logits. T^2 keeps the gradient scale of the soft term independent of T.

Because `DistillTask` follows the `Task` Protocol, every stepper trains with it
unchanged: the student's task loss and its logits come from ONE forward pass
(`Task.loss_logits`). The teacher (frozen, eval mode, no_grad) runs once per distinct
example: its logits at the read positions are kept per example, keyed by the example's
unpadded tokens. A MeZO step evaluates the same batch 2q times and P-RGE evaluates it as
C stacked copies (`repeat_batch`); both find every row in the store and only gather
(tile) it, so the teacher costs one forward pass per step whatever q is. The store holds
the `keep` most recent examples (one step's batch); `keep=None` keeps all (the up-front
cache of every training row, after which the teacher can be freed).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from edgetune.data.tasks.base import LossLogits, Task, batches, evaluating


class TeacherLogits:
    """The teacher's logits at the read positions, per distinct example.

    Args:
        task: the wrapped task (gives the read positions).
        teacher: the frozen teacher model, or None once every needed row is stored.
        keep: how many examples to keep (oldest dropped first); None keeps all.
    """

    def __init__(self, task: Task, teacher: torch.nn.Module | None, keep: int | None):
        self.task, self.teacher, self.keep = task, teacher, keep
        self.store: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.teacher_calls = 0  # forward passes of the teacher (tests count them)

    @property
    def megabytes(self) -> float:
        """Memory the stored logits take (rows x read positions x vocabulary x 4 bytes)."""
        return sum(t.numel() * t.element_size() for t in self.store.values()) / 2**20

    def fill(self, rows: Sequence[dict], batch_size: int) -> None:
        """Store the logits of every row of `rows` (the up-front cache)."""
        for chunk in batches(rows, batch_size):
            batch = self.task.collate(chunk)
            self._ensure(batch, _keys(batch))

    def lookup(self, batch: dict[str, torch.Tensor], read: torch.Tensor) -> torch.Tensor:
        """Teacher logits for `batch` laid out like the student's, [B, P, V] (zeros where
        `read` [B, P] is False); runs the teacher on the rows not yet stored only."""
        keys = _keys(batch)
        self._ensure(batch, keys)
        out = torch.zeros(*read.shape, self.store[keys[0]].shape[-1])
        for i, key in enumerate(keys):
            out[i, read[i]] = self.store[key]
        while self.keep is not None and len(self.store) > max(self.keep, len(set(keys))):
            self.store.popitem(last=False)
        return out

    def _ensure(self, batch: dict[str, torch.Tensor], keys: list[bytes]) -> None:
        """Run the teacher once on the distinct rows of `batch` that are not stored."""
        rows: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in self.store:
                rows.setdefault(key, i)
        if not rows:
            return
        if self.teacher is None:
            raise RuntimeError("an example outside the teacher cache, and the teacher was freed")
        index = list(rows.values())
        sub = {name: value[index] for name, value in batch.items()}
        with evaluating(self.teacher):
            found = self.task.loss_logits(self.teacher, sub)
        self.teacher_calls += 1
        for j, key in enumerate(rows):
            self.store[key] = found.logits[j, found.read[j]].clone()


class DistillTask:
    """`task` with its loss mixed with the KL divergence to a teacher's distribution.

    Args:
        task: the task being recovered on (its `evaluate` is used unchanged).
        teacher: the teacher's logits store (wraps the teacher model).
        alpha: weight of the distillation term, in [0, 1] (0 = the task loss alone).
        temperature: softmax temperature T > 0 of both distributions.
    """

    def __init__(self, task: Task, teacher: TeacherLogits, alpha: float, temperature: float):
        self.task, self.teacher = task, teacher
        self.alpha, self.temperature = alpha, temperature
        self.name = task.name

    def prepare_rows(self, rows: Sequence[dict]) -> list[dict]:
        """The wrapped task's rows."""
        return self.task.prepare_rows(rows)

    def collate(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        """The wrapped task's batch."""
        return self.task.collate(rows)

    def example_losses(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """(1 - alpha) * task loss + alpha * T^2 * KL per example, [B]."""
        return self.loss_logits(model, batch).losses

    def loss_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossLogits:
        """The mixed loss from one student pass, with the logits it read."""
        student = self.task.loss_logits(model, batch)
        kl = self.kl(student, self.teacher.lookup(batch, student.read))
        losses = (1.0 - self.alpha) * student.losses + self.alpha * self.temperature**2 * kl
        return LossLogits(losses, student.logits, student.read)

    def kl(self, student: LossLogits, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Mean over read positions of KL(teacher_T || student_T) per example, [B]."""
        t = self.temperature
        log_s = F.log_softmax(student.logits / t, dim=-1)
        log_t = F.log_softmax(teacher_logits / t, dim=-1)
        per_position = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
        read = student.read.float()
        return (per_position * read).sum(1) / read.sum(1).clamp_min(1.0)

    def evaluate(
        self,
        model: torch.nn.Module,
        rows: Sequence[dict],
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> dict[str, float]:
        """The wrapped task's metrics (the teacher plays no part in evaluation)."""
        return self.task.evaluate(model, rows, batch_size, on_batch)


def _keys(batch: dict[str, torch.Tensor]) -> list[bytes]:
    """Each example's identity: its unpadded tokens (padding side and length do not matter)."""
    pairs = zip(batch["input_ids"], batch["attention_mask"], strict=True)
    return [ids[mask.bool()].numpy().tobytes() for ids, mask in pairs]
