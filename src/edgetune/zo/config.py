"""Zeroth-order estimator settings."""

from __future__ import annotations

from dataclasses import dataclass

from edgetune.config import check_choice, check_positive, option

ZO_ESTIMATORS = ("central", "one-sided")


@dataclass
class ZOConfig:
    """How a zeroth-order step estimates the gradient."""

    eps: float = option(1e-3, "perturbation scale epsilon")
    queries: int = option(1, "directions q averaged per step")
    estimator: str = option("central", "central: (L+ - L-)/2eps; one-sided: (L+ - L0)/eps")
    parallel_inner: bool = option(
        True, "prge: +eps and -eps copies in the same pass (False: two passes, + then -)"
    )

    def __post_init__(self) -> None:
        check_positive("zo", "eps", self.eps)
        check_positive("zo", "queries", self.queries)
        check_choice("zo", "estimator", self.estimator, ZO_ESTIMATORS)
