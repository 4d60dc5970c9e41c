"""Federated algorithms: one module each, registered by name.

`build_algorithm(cfg, fed)` makes the run's algorithm object; `roles(fed, algo)` gives
the planner and the evaluation the round loop uses with it (FedSpine plans with its
bandits and evaluates its pruned sub-model; the others use the static planner and the
global adapter on the full model).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgetune.fed.algorithms.fedit import FedIT
from edgetune.fed.algorithms.fedkseed import FedKSeed
from edgetune.fed.algorithms.fedspine import FedSpine
from edgetune.fed.algorithms.fwdllm import FwdLLM

ALGORITHMS: dict[str, Any] = {  # name -> class (a FedAlgorithm)
    "fedit": FedIT,
    "fedkseed": FedKSeed,
    "fedkseed-pro": FedKSeed,
    "fwdllm": FwdLLM,
    "fedspine": FedSpine,
}


def build_algorithm(cfg: Any, fed: Any) -> Any:
    """The algorithm of `cfg.fed.algorithm` over the federation `fed`'s adapter."""
    if cfg.fed.algorithm == "fedspine":
        spine = FedSpine(cfg, fed.adapter, fed.num_params)
        spine.planner.check_fleet(fed.fleet)
        return spine
    return ALGORITHMS[cfg.fed.algorithm](
        cfg.fed, fed.adapter, cfg.seed, float(cfg.optim.lr or 1e-3)
    )


def roles(fed: Any, algo: Any) -> tuple[Any, Callable[[bool], dict[str, float]]]:
    """(planner, evaluate(progress)) for `algo`'s rounds."""
    from edgetune.fed.plan import StaticPlanner

    if isinstance(algo, FedSpine):
        return algo.planner, lambda progress: algo.evaluate(fed, progress)
    return StaticPlanner(fed.cfg, fed.num_params), fed.evaluate


def deploy(algo: Any, fed: Any, out: Path, adapter_dir: Path) -> dict[str, dict[str, Any]]:
    """Per device class, the pruned model it deploys, written under `out` (FedSpine);
    {} for the others (they deploy the global adapter on the full model)."""
    if not isinstance(algo, FedSpine):
        return {}
    return algo.deploy(fed, out, adapter_dir, fed.cfg.train.progress)


__all__ = [
    "ALGORITHMS",
    "FedIT",
    "FedKSeed",
    "FedSpine",
    "FwdLLM",
    "build_algorithm",
    "deploy",
    "roles",
]
