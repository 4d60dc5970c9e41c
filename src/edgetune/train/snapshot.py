"""A copy of the trainable state at one step: what a rollback restores and what
`train.keep=best` saves as the run's result.

Only the trainable tensors (a LoRA adapter: a few MB) and the optimizer state are copied,
never the frozen base. With full-parameter training a snapshot is one more copy of the
model's weights: `train.guard=false train.keep=last` keeps the memory of inference.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Snapshot:
    """The adapter tensors (and, for a rollback target, the stepper state) after `step`."""

    step: int
    adapter: dict[str, torch.Tensor]
    stepper: dict[str, Any] | None = None

    @classmethod
    def take(cls, step: int, adapter: Any, stepper: Any = None) -> Snapshot:
        """Copy the state now (tensors cloned, so later in-place updates do not reach it)."""
        tensors = {k: v.detach().clone() for k, v in adapter.state_dict().items()}
        state = copy.deepcopy(stepper.state_dict()) if stepper is not None else None
        return cls(step, tensors, state)

    def restore(self, adapter: Any, stepper: Any = None) -> None:
        """Put the copied state back in place."""
        adapter.load_state_dict(self.adapter)
        if stepper is not None and self.stepper is not None:
            stepper.load_state_dict(copy.deepcopy(self.stepper))

    def to_dict(self) -> dict[str, Any]:
        """For a checkpoint's kept.pt (tensors and plain values only: loads weights_only)."""
        return {"step": self.step, "adapter": self.adapter, "stepper": self.stepper}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Snapshot | None:
        return cls(data["step"], data["adapter"], data.get("stepper")) if data else None
