"""A client's local training in a round: a few steps of fo / zo / prge on its own rows.

The same job runs in the in-process simulator and in a Flower ClientApp. Batches are a
stateless function of (client seed, local step); the client seed is derived from
(run seed, round, client) in the JOB seed stream, so every round of every client is
reproducible on its own.

A job with a `runtime` (a device whose profile names ONNX Runtime or ExecuTorch) runs
the same steppers on a `RuntimeAdapter` over the adapter's own LoRA tensors, so its
forward passes go through the exported graph and its updates land in the adapter
(`fed/runtime_client.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgetune.fed.runtime_client import RuntimeLink
from edgetune.ondevice.adapter import RuntimeAdapter
from edgetune.peft import Adapter
from edgetune.train.config import OptimConfig
from edgetune.train.factory import build_stepper
from edgetune.train.sampler import batch_indices
from edgetune.train.steps import StepResult
from edgetune.zo.config import ZOConfig


@dataclass
class ClientJob:
    """Everything one client needs for one round of local training."""

    client: int
    round: int  # 0-based
    method: str  # fo | zo | prge
    task: Any
    rows: Sequence[dict]
    steps: int
    batch_size: int
    lr: float
    seed: int  # derived from (run seed, round, client)
    optim: OptimConfig
    zo: ZOConfig
    grad_accum: int = 1
    runtime: RuntimeLink | None = None  # the exported graph it runs (None: PyTorch)
    trunk: str = "auto"  # train.trunk: frozen bottom blocks run once per batch

    def stepper(self, adapter: Adapter | RuntimeAdapter, estimator: Any = None) -> Any:
        """The stepper for this client's method (`train/factory.py`, as `finetune`
        builds it; the algorithm may supply the ZO estimator). ZO restores exactly, so a
        trace replays bit for bit; a RuntimeAdapter runs P-RGE's copies as the graph's
        copy axis."""
        copies = adapter.model.copies if isinstance(adapter, RuntimeAdapter) else None
        return build_stepper(
            self.method,
            adapter,
            self.task,
            self.optim,
            self.zo,
            self.grad_accum,
            self.seed,
            exact_restore=True,
            estimator=estimator,
            copies=copies,
            trunk=self.trunk,
        )

    def run(self, adapter: Adapter, estimator: Any = None) -> list[StepResult]:
        """Run the local steps in place on `adapter` (through the runtime, if the job
        has one); returns each step's result."""
        trained = self.runtime.attach(adapter) if self.runtime is not None else adapter
        stepper = self.stepper(trained, estimator)
        results = []
        for step in range(self.steps):
            idx = batch_indices(step, len(self.rows), self.batch_size, self.seed)
            results.append(stepper.step([self.rows[i] for i in idx], step, self.lr))
        return results
