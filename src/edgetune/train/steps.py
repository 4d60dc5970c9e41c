"""Step functions: one optimizer step from a batch of rows, first-order or zeroth-order.

A stepper owns its optimizer state and exposes `step(rows, step, lr) -> StepResult`,
`state_dict()` and `load_state_dict()`, so the loop and checkpoints treat both alike.
Batches are split into `grad_accum` micro-batches; the loss of a step is the mean
per-example loss over the whole batch either way. With a shared `Trunk` the frozen bottom
blocks run once per micro-batch and every forward pass of the step runs only the top.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from edgetune.peft import Adapter
from edgetune.peft.multicopy import multi_copy, repeat_batch
from edgetune.train.trunk import FULL_DEPTH, Trunk
from edgetune.zo import Estimator, ZOEstimate
from edgetune.zo.normalize import RMSNormalizer
from edgetune.zo.optimizers import ZOOptimizer
from edgetune.zo.prge import PRGEEstimator
from edgetune.zo.seeds import derive_seed


@dataclass
class StepResult:
    """What a step reports: its loss and, for ZO, the estimate it applied."""

    loss: float
    estimate: ZOEstimate | None = None
    extras: dict[str, float] = field(default_factory=dict)


class Stepper(Protocol):
    """One optimizer step over a batch of rows."""

    def step(self, rows: Sequence[dict], step: int, lr: float) -> StepResult: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def micro_batches(rows: Sequence[dict], parts: int) -> list[Sequence[dict]]:
    """Split rows into `parts` equal consecutive chunks."""
    size = len(rows) // parts
    return [rows[i * size : (i + 1) * size] for i in range(parts)]


class FirstOrderStepper:
    """Backprop through the adapter with AdamW or SGD, grad accumulation and clipping."""

    def __init__(
        self,
        adapter: Adapter,
        task: Any,
        optim: Any,
        grad_accum: int,
        seed: int,
        trunk: Trunk = FULL_DEPTH,
    ):
        self.adapter, self.task, self.grad_accum, self.seed = adapter, task, grad_accum, seed
        self.trunk = trunk
        self.grad_clip = optim.grad_clip
        params = adapter.trainable()
        if optim.name == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                params, lr=optim.lr, weight_decay=optim.weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(
                params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
            )

    def step(self, rows: Sequence[dict], step: int, lr: float) -> StepResult:
        """Forward + backward over micro-batches, then one optimizer update."""
        model = self.adapter.model
        model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        # Dropout draws from the global RNG: seed it per step so a resumed run matches.
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(self.seed, step))
            for chunk in micro_batches(rows, self.grad_accum):
                batch = self.task.collate(chunk)
                with self.trunk.top(self.trunk.hidden(batch)):
                    losses = self.task.example_losses(model, batch)
                loss = losses.mean() / self.grad_accum
                loss.backward()
                total += float(loss.detach())
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.adapter.trainable(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        model.eval()
        return StepResult(total)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state (moments, step counts)."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the optimizer state."""
        self.optimizer.load_state_dict(state["optimizer"])


class ZOStepper:
    """A zeroth-order step: estimate (seeds, scalars) from forward passes, then apply.

    The model stays in eval mode so the +eps and -eps passes see the same network
    (no dropout noise in the difference).
    """

    def __init__(
        self,
        adapter: Adapter,
        task: Any,
        estimator: Estimator,
        optimizer: ZOOptimizer,
        grad_accum: int,
        seed: int,
        trunk: Trunk = FULL_DEPTH,
        normalizer: RMSNormalizer | None = None,
    ):
        """`normalizer` (zo.scale=rms) divides each step's scalars by their running RMS
        before the update (`zo/normalize.py`)."""
        self.adapter, self.task, self.estimator = adapter, task, estimator
        self.optimizer, self.grad_accum, self.seed = optimizer, grad_accum, seed
        self.trunk = trunk
        self.normalizer = normalizer

    def batches(self, rows: Sequence[dict]) -> list[tuple[dict, torch.Tensor | None]]:
        """Each micro-batch of `rows` with its trunk hidden states (None at full depth),
        computed once for every forward pass of the step."""
        batches = [self.task.collate(chunk) for chunk in micro_batches(rows, self.grad_accum)]
        return [(b, self.trunk.hidden(b)) for b in batches]

    def loss_fn(self, rows: Sequence[dict]) -> Any:
        """A closure returning the mean per-example loss of `rows` at the current params."""
        batches = self.batches(rows)

        @torch.no_grad()
        def loss() -> float:
            values = []
            for batch, hidden in batches:
                with self.trunk.top(hidden):
                    values.append(self.task.example_losses(self.adapter.model, batch).mean())
            return float(torch.stack(values).mean())

        return loss

    def step(self, rows: Sequence[dict], step: int, lr: float) -> StepResult:
        """Estimate with seeds derived from (run seed, step), then update in place."""
        self.adapter.model.eval()
        params = self.adapter.trainable()
        estimate = self.estimator.estimate(self.loss_fn(rows), params, derive_seed(self.seed, step))
        return self.apply(params, estimate, lr)

    def apply(self, params: list[torch.Tensor], estimate: ZOEstimate, lr: float) -> StepResult:
        """Normalise the estimate's scalars (zo.scale=rms), then update in place."""
        if self.normalizer is not None:
            estimate = self.normalizer(estimate)
        self.optimizer.step(params, estimate, lr)
        return StepResult(estimate.loss, estimate)

    def state_dict(self) -> dict[str, Any]:
        """The ZO optimizer's state (empty for ZO-SGD) and the scalars' running RMS."""
        state = {"optimizer": self.optimizer.state_dict()}
        if self.normalizer is not None:
            state["normalizer"] = self.normalizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the ZO optimizer's state (and the scalars' running RMS)."""
        self.optimizer.load_state_dict(state.get("optimizer", {}))
        if self.normalizer is not None:
            self.normalizer.load_state_dict(state.get("normalizer", {}))


class PRGEStepper(ZOStepper):
    """A P-RGE step: the 2q perturbed adapters evaluated side by side in one pass.

    Same (seeds, scalars) and the same update as `ZOStepper` with MeZO and equal seeds;
    only how the losses are computed differs (one batched pass over stacked copies).
    """

    estimator: PRGEEstimator  # type: ignore[assignment]

    def __init__(
        self,
        adapter: Adapter,
        task: Any,
        estimator: PRGEEstimator,
        optimizer: ZOOptimizer,
        grad_accum: int,
        seed: int,
        copies: Callable[[dict[int, torch.Tensor], int], AbstractContextManager] | None = None,
        trunk: Trunk = FULL_DEPTH,
        normalizer: RMSNormalizer | None = None,
    ):
        """`copies(copies, C)` is the context in which the model runs C adapter copies on
        a C-times repeated batch; default: PEFT multi-copy LoRA (`peft/multicopy.py`).
        With a shared trunk the C-times repetition starts at the cut."""
        super().__init__(adapter, task, estimator, optimizer, grad_accum, seed, trunk, normalizer)
        self.copies = copies or (lambda c, n: multi_copy(self.adapter.model, c, n))

    def copy_losses(self, rows: Sequence[dict]) -> Any:
        """A closure (copies, C) -> mean loss of each copy over `rows`, shape [C]."""
        batches = self.batches(rows)
        model = self.adapter.model

        @torch.no_grad()
        def losses(copies: dict[int, torch.Tensor], num_copies: int) -> torch.Tensor:
            per_batch = []
            with self.copies(copies, num_copies):
                for batch, hidden in batches:
                    with self.trunk.top(hidden):
                        each = self.task.example_losses(model, repeat_batch(batch, num_copies))
                    per_batch.append(each.view(num_copies, -1).mean(1))
            return torch.stack(per_batch).mean(0)

        return losses

    def step(self, rows: Sequence[dict], step: int, lr: float) -> StepResult:
        """Estimate with P-RGE (seeds from (run seed, step)), then update in place."""
        self.adapter.model.eval()
        params = self.adapter.trainable()
        estimate = self.estimator.estimate(
            self.copy_losses(rows), params, derive_seed(self.seed, step)
        )
        return self.apply(params, estimate, lr)
