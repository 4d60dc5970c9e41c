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
    """The stepper for `method` (fo | zo | prge).

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
    if method == "fo":
        return FirstOrderStepper(adapter, task, optim, grad_accum, seed, shared)
    optimizer = make_zo_optimizer(zo, optim.weight_decay)
    normalizer = RMSNormalizer() if zo.scale == "rms" else None
    if method == "prge":
        prge = estimator or PRGEEstimator(zo.eps, zo.queries, zo.parallel_inner)
        return PRGEStepper(
            adapter, task, prge, optimizer, grad_accum, seed, copies, shared, normalizer
        )
    if estimator is None and zo.estimator == "fwdgrad":
        estimator = ForwardGradientEstimator(
            zo.eps,
            zo.queries,
            max(zo.max_queries, zo.queries),
            zo.var_threshold,
            exact_restore=exact_restore,
        )
    elif estimator is None:
        one_sided = zo.estimator == "one-sided"
        estimator = MeZOEstimator(zo.eps, zo.queries, one_sided, exact_restore)
    return ZOStepper(adapter, task, estimator, optimizer, grad_accum, seed, shared, normalizer)
