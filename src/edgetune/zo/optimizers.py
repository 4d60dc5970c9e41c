"""The ZO optimizer registry: name -> constructor (one module per optimizer)."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from edgetune.zo.adam import ZOAdam
from edgetune.zo.estimate import ZOEstimate
from edgetune.zo.momentum import ZOMomentum
from edgetune.zo.sgd import ZOSGD
from edgetune.zo.sign import ZOSign


class ZOOptimizer(Protocol):
    """Applies a (seeds, scalars) estimate to the trainable tensors, in place."""

    def step(self, params: list[torch.Tensor], estimate: ZOEstimate, lr: float) -> None: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


ZO_OPTIMIZERS: dict[str, Any] = {
    "sgd": lambda cfg, wd: ZOSGD(weight_decay=wd),
    "momentum": lambda cfg, wd: ZOMomentum(beta=cfg.beta1, weight_decay=wd),
    "adam": lambda cfg, wd: ZOAdam(beta1=cfg.beta1, beta2=cfg.beta2, weight_decay=wd),
    "sign": lambda cfg, wd: ZOSign(weight_decay=wd),
}


def make_zo_optimizer(cfg: Any, weight_decay: float) -> Any:
    """Build the ZO optimizer named by `cfg.optimizer` (a ZOConfig)."""
    return ZO_OPTIMIZERS[cfg.optimizer](cfg, weight_decay)
