"""Single-device training: steppers (first-order, ZO), the loop, checkpoints."""

from edgetune.train.config import OptimConfig, TrainConfig
from edgetune.train.loop import LoopState, evaluate, fit
from edgetune.train.steps import FirstOrderStepper, PRGEStepper, StepResult, ZOStepper

__all__ = [
    "FirstOrderStepper",
    "LoopState",
    "PRGEStepper",
    "OptimConfig",
    "StepResult",
    "TrainConfig",
    "ZOStepper",
    "evaluate",
    "fit",
]
