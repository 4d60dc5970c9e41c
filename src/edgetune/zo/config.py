"""Zeroth-order estimator settings."""

from __future__ import annotations

from dataclasses import dataclass, fields

from edgetune.config import check_choice, check_positive, option
from edgetune.errors import ConfigError

ZO_ESTIMATORS = ("central", "one-sided", "fwdgrad")
ZO_OPTIMIZER_NAMES = ("sgd", "momentum", "adam", "sign")
ZO_SCALES = ("auto", "rms", "none")


@dataclass
class ZOConfig:
    """How a zeroth-order step estimates the gradient."""

    eps: float = option(1e-3, "perturbation scale epsilon")
    queries: int = option(1, "directions q averaged per step", flag="--queries")
    estimator: str = option(
        "central",
        "central: (L+ - L-)/2eps; one-sided: (L+ - L0)/eps; fwdgrad: FwdLLM variance-controlled",
    )
    max_queries: int = option(16, "fwdgrad: cap on directions per step (queries = the minimum)")
    var_threshold: float = option(1.0, "fwdgrad: stop when var(g_bar)/||g_bar||^2 <= this")
    optimizer: str = option("sgd", "update rule: sgd | momentum | adam | sign")
    beta1: float = option(0.9, "momentum / Adam first-moment decay")
    beta2: float = option(0.999, "Adam second-moment decay")
    exact_restore: str = option(
        "auto",
        "restore theta after a perturbation from a copy (bit-exact replay) instead of by "
        "subtraction: auto (on for PEFT adapters, off for full/last-n) | true | false",
    )
    scale: str = option(
        "auto",
        "divide each step's projected gradients by their running RMS: rms | none | auto "
        "(rms when the step size is not given: the default recipe)",
    )
    parallel_inner: bool = option(
        True, "prge: +eps and -eps copies in the same pass (False: two passes, + then -)"
    )

    def __post_init__(self) -> None:
        check_positive("zo", "eps", self.eps)
        check_positive("zo", "queries", self.queries)
        check_choice("zo", "estimator", self.estimator, ZO_ESTIMATORS)
        check_positive("zo", "max_queries", self.max_queries)
        check_positive("zo", "var_threshold", self.var_threshold, allow_zero=True)
        check_choice(
            "zo", "exact_restore", str(self.exact_restore).lower(), ("auto", "true", "false")
        )
        check_choice("zo", "optimizer", self.optimizer, ZO_OPTIMIZER_NAMES)
        check_choice("zo", "scale", self.scale, ZO_SCALES)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"zo.{name}: expected a value in [0, 1), got {value!r}")

    def check_read_by(self, method: str, read: set[str], estimator_only: set[str]) -> None:
        """Refuse a zo setting that training `method` would never read.

        A setting counts as given when it differs from its default (a config that spells
        out a default value is accepted: it asks for nothing the run does not do).

        Args:
            read: the settings `method` reads with these settings (`train.factory`).
            estimator_only: settings read only with a particular zo.estimator.

        Raises:
            ConfigError: names the setting, the method and the fix.
        """
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in read or value == f.default:
                continue
            if f.name == "estimator":  # only zo has a choice of estimator
                raise ConfigError(
                    f"zo.estimator={value!r} does not apply to train.method={method!r} "
                    f"(P-RGE is its own batched central estimator): use --method zo for "
                    f"the {value} estimator, or drop zo.estimator"
                )
            raise ConfigError(
                f"zo.{f.name}={value!r} is not used by train.method={method!r}: drop it, "
                f"or pick a method that reads it"
                + (" (zo.estimator=fwdgrad with --method zo)" if f.name in estimator_only else "")
            )
