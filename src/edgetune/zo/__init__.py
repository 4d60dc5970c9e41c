"""Zeroth-order optimisation: seeds, directions, estimators and ZO optimizers."""

from edgetune.zo.config import ZOConfig
from edgetune.zo.directions import add_direction, direction_vector
from edgetune.zo.estimate import Estimator, ZOEstimate
from edgetune.zo.mezo import MeZOEstimator
from edgetune.zo.seeds import derive_seed, generator
from edgetune.zo.sgd import ZOSGD, apply_estimate

__all__ = [
    "ZOSGD",
    "Estimator",
    "MeZOEstimator",
    "ZOConfig",
    "ZOEstimate",
    "add_direction",
    "apply_estimate",
    "derive_seed",
    "direction_vector",
    "generator",
]
