"""FwdLLM: federated forward-gradient fine-tuning with variance control.

Xu et al., "FwdLLM: Efficient FedLLM using Forward Gradient" (2023). Clients never
backpropagate: each local step is a forward-gradient estimate whose number of directions
is set by its variance (`ForwardGradientEstimator`), and directions are chosen to agree
with the previous global update (discriminative sampling: of `fwd_candidates` seeds per
draw, the one whose z is most aligned with the last global delta). Clients upload the
seeds and coefficients of their steps (`SeedTrace`); the server replays them into deltas
and averages them as FedIT does (FwdLLM's server is FedAvg on the PEFT parameters).

The prior is the global step since the last broadcast a device received, when that was
the previous round: a device keeps that broadcast (its `ClientState`), so the prior costs
no extra bytes. A device that skipped a round, or whose planned shapes changed, samples
without a prior.
"""

from __future__ import annotations

from typing import Any

import torch

from edgetune.fed.algorithms.deltas import (
    DEVICE_SECRET,
    SERVER_SETTINGS,
    DeltaAlgorithm,
    release,
    train_delta,
)
from edgetune.fed.algorithms.registry import AlgorithmSpec, register
from edgetune.fed.local import ClientJob
from edgetune.fed.payloads import ClientState, SeedTrace
from edgetune.peft import Adapter
from edgetune.zo.fwdgrad import ForwardGradientEstimator


class FwdLLM(DeltaAlgorithm):
    """FedIT's server (a `DeltaServer`) with forward-gradient clients."""

    def __init__(self, fed: Any, adapter: Adapter, privacy: Any = None, seed: int = 0):
        """`fed` is the run's `fed` section (`fwd_candidates` and the server's)."""
        super().__init__(fed, adapter, privacy, seed)
        self.candidates = fed.fwd_candidates

    def client_update(
        self, adapter: Adapter, payload: Any, job: ClientJob, state: ClientState | None
    ) -> tuple[Any, ClientState | None]:
        """Train with the forward gradient steered by the global step since the
        broadcast this device kept, and keep this broadcast."""
        held = None
        if state is not None and state.values.get("round") == job.round - 1:
            held = {k: v for k, v in state.tensors.items() if k != DEVICE_SECRET}
        estimator = self.local_estimator(job, prior(payload.tensors, held))
        update = train_delta(adapter, payload, job, estimator)
        kept = ClientState(dict(payload.tensors), {"round": float(job.round)})
        if self.device_privacy is not None:  # dp.where=device: a noised delta
            update, secret = release(self.device_privacy, update, adapter, payload, job, state)
            kept.tensors[DEVICE_SECRET] = secret
        return update, kept

    def local_estimator(
        self, job: ClientJob, steer: torch.Tensor | None
    ) -> ForwardGradientEstimator:
        """Variance-controlled forward gradient, steered by `steer` (None: unsteered)."""
        return ForwardGradientEstimator(
            eps=job.zo.eps,
            min_queries=max(2, job.zo.queries),
            max_queries=max(job.zo.max_queries, job.zo.queries),
            threshold=job.zo.var_threshold,
            candidates=self.candidates,
            prior=steer,
            exact_restore=True,
        )


def prior(
    tensors: dict[str, torch.Tensor], held: dict[str, torch.Tensor] | None
) -> torch.Tensor | None:
    """broadcast - previous broadcast, flattened (None without one, if the shapes
    differ, or if equal)."""
    if held is None or held.keys() != tensors.keys():
        return None
    if any(held[k].shape != t.shape for k, t in tensors.items()):
        return None
    step = torch.cat([(t - held[k]).flatten() for k, t in tensors.items()])
    return step if step.norm() > 0 else None


register(
    AlgorithmSpec(
        name="fwdllm",
        build=lambda setup: FwdLLM(setup.fed, setup.adapter, setup.privacy, setup.seed),
        help="forward-gradient clients with variance control, FedAvg server",
        settings=(*SERVER_SETTINGS, "fwd_candidates"),
        reads=("zo.max_queries", "zo.var_threshold"),
        forward_only=True,
        uploads=(SeedTrace,),
        private=True,
        private_on_device=True,
    )
)
