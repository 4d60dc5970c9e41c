"""The one place a training method becomes a stepper: `finetune`, `ondevice`, `recover`
and every federated client build their steppers here.

    fo    -> FirstOrderStepper (optim.name: AdamW or SGD)
    prge  -> PRGEStepper (all 2q perturbed copies in one batched pass)
    zo    -> ZOStepper (MeZO central / one-sided, or FwdLLM's forward gradient)

with the ZO update rule `zo.optimizer`, after the scalars are divided by their running
RMS when `zo.scale=rms` (the default ZO recipe: `train.config.resolve_step_size`).
A caller may supply the estimator (FedKSeed's seed pool, FwdLLM's steered forward
gradient) and, for P-RGE, how the copies run (an exported graph's copy axis on a device
runtime).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgetune.train.config import OptimConfig
from edgetune.train.steps import FirstOrderStepper, PRGEStepper, ZOStepper
from edgetune.train.trunk import resolve_trunk
from edgetune.zo.config import ZOConfig
from edgetune.zo.fwdgrad import ForwardGradientEstimator
from edgetune.zo.mezo import MeZOEstimator
from edgetune.zo.normalize import RMSNormalizer
from edgetune.zo.optimizers import make_zo_optimizer
from edgetune.zo.prge import PRGEEstimator


@dataclass(frozen=True)
class Method:
    """A training method: how its stepper is built, and the zo settings it reads (with
    the extra ones a zo.estimator value reads). Refusals of the others derive from it."""

    build: Callable[..., Any]
    reads: tuple[str, ...] = ()
    estimator_reads: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def zo_settings(self, zo: ZOConfig) -> set[str]:
        """The zo settings a run of this method with `zo` reads."""
        return {*self.reads, *self.estimator_reads.get(zo.estimator, ())}


def build_stepper(
    method: str,
    adapter: Any,
    task: Any,
    optim: OptimConfig,
    zo: ZOConfig,
    grad_accum: int,
    seed: int,
    *,
    exact_restore: bool,
    estimator: Any = None,
    copies: Callable[..., Any] | None = None,
    trunk: str = "auto",
) -> Any:
    """The stepper for `method` (a key of `METHODS`).

    Args:
        exact_restore: ZO restores theta from a copy after each perturbation (bit-exact
            replay) instead of by subtraction.
        estimator: replaces the ZO / P-RGE estimator the settings describe.
        copies: P-RGE only: the context that runs C adapter copies (default: PEFT
            multi-copy LoRA); given, the forward passes run in an exported graph.
        trunk: `train.trunk`, the frozen bottom blocks run once per batch
            (`train/trunk.py`).
    """
    shared = resolve_trunk(trunk, adapter.model, runtime=copies is not None)
    setup = StepperSetup(adapter, task, optim, zo, grad_accum, seed, exact_restore, shared)
    return METHODS[method].build(setup, estimator, copies)


@dataclass(frozen=True)
class StepperSetup:
    """What every method's stepper is built from."""

    adapter: Any
    task: Any
    optim: OptimConfig
    zo: ZOConfig
    grad_accum: int
    seed: int
    exact_restore: bool
    shared: Any  # the resolved trunk


def _first_order(s: StepperSetup, estimator: Any, copies: Any) -> FirstOrderStepper:
    return FirstOrderStepper(s.adapter, s.task, s.optim, s.grad_accum, s.seed, s.shared)


def _prge(s: StepperSetup, estimator: Any, copies: Any) -> PRGEStepper:
    zo = s.zo
    prge = estimator or PRGEEstimator(zo.eps, zo.queries, zo.parallel_inner)
    optimizer = make_zo_optimizer(zo, s.optim.weight_decay)
    return PRGEStepper(
        s.adapter, s.task, prge, optimizer, s.grad_accum, s.seed, copies, s.shared, _scaler(zo)
    )


def _zo(s: StepperSetup, estimator: Any, copies: Any) -> ZOStepper:
    zo = s.zo
    if estimator is None and zo.estimator == "fwdgrad":
        estimator = ForwardGradientEstimator(
            zo.eps,
            zo.queries,
            max(zo.max_queries, zo.queries),
            zo.var_threshold,
            exact_restore=s.exact_restore,
        )
    elif estimator is None:
        one_sided = zo.estimator == "one-sided"
        estimator = MeZOEstimator(zo.eps, zo.queries, one_sided, s.exact_restore)
    optimizer = make_zo_optimizer(zo, s.optim.weight_decay)
    return ZOStepper(
        s.adapter, s.task, estimator, optimizer, s.grad_accum, s.seed, s.shared, _scaler(zo)
    )


def _scaler(zo: ZOConfig) -> RMSNormalizer | None:
    return RMSNormalizer() if zo.scale == "rms" else None


_UPDATE = ("eps", "queries", "optimizer", "beta1", "beta2", "scale")  # every ZO update's
METHODS: dict[str, Method] = {  # train.method -> how it trains; TRAIN_METHODS lists these
    "fo": Method(_first_order),
    "zo": Method(
        _zo,
        (*_UPDATE, "estimator", "exact_restore"),
        {"fwdgrad": ("max_queries", "var_threshold")},
    ),
    "prge": Method(_prge, (*_UPDATE, "parallel_inner")),
}


def check_zo_read(method: str, zo: ZOConfig) -> None:
    """Refuse the zo settings `method` (with `zo.estimator`) would not read.

    Raises:
        ConfigError: names the setting, the method and the fix.
    """
    spec = METHODS[method]
    only = {
        name for m in METHODS.values() for names in m.estimator_reads.values() for name in names
    }
    zo.check_read_by(method, spec.zo_settings(zo), only)
