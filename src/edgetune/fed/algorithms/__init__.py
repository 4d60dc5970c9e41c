"""Federated algorithms: one module each, registered by name."""

from typing import Any

from edgetune.fed.algorithms.fedit import FedIT
from edgetune.fed.algorithms.fedkseed import FedKSeed
from edgetune.fed.algorithms.fwdllm import FwdLLM

ALGORITHMS: dict[str, Any] = {  # name -> class (a FedAlgorithm)
    "fedit": FedIT,
    "fedkseed": FedKSeed,
    "fedkseed-pro": FedKSeed,
    "fwdllm": FwdLLM,
}

__all__ = ["ALGORITHMS", "FedIT", "FedKSeed", "FwdLLM"]
