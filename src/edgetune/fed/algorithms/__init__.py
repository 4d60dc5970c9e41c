"""Federated algorithms: one module each, registered by name."""

from edgetune.fed.algorithms.fedit import FedIT
from edgetune.fed.algorithms.fedkseed import FedKSeed

ALGORITHMS = {"fedit": FedIT, "fedkseed": FedKSeed, "fedkseed-pro": FedKSeed}

__all__ = ["ALGORITHMS", "FedIT", "FedKSeed"]
