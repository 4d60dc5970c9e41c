"""FwdLLM: federated forward-gradient fine-tuning with variance control.

Xu et al., "FwdLLM: Efficient FedLLM using Forward Gradient" (2023). Clients never
backpropagate: each local step is a forward-gradient estimate whose number of directions
is set by its variance (`ForwardGradientEstimator`), and directions are chosen to agree
with the previous global update (discriminative sampling: of `fwd_candidates` seeds per
draw, the one whose z is most aligned with the last global delta). Clients upload the
seeds and coefficients of their steps (`SeedTrace`); the server replays them into deltas
and averages them as FedIT does (FwdLLM's server is FedAvg on the PEFT parameters).

Clients keep the previous global adapter they received (Flower context state), so the
prior direction costs no extra bytes; the simulator models that with the server's copy.
"""

from __future__ import annotations

from typing import Any

import torch

from edgetune.fed.algorithms.fedit import FedIT
from edgetune.fed.local import ClientJob
from edgetune.peft import Adapter
from edgetune.zo.fwdgrad import ForwardGradientEstimator


class FwdLLM(FedIT):
    """FedIT's server with forward-gradient clients."""

    name = "fwdllm"

    def __init__(self, cfg: Any, adapter: Adapter, seed: int):
        super().__init__(cfg, adapter, seed)
        self.prior: torch.Tensor | None = None

    def local_estimator(self, job: ClientJob) -> ForwardGradientEstimator:
        """Variance-controlled forward gradient, steered by the last global update."""
        return ForwardGradientEstimator(
            eps=job.eps,
            min_queries=max(2, job.queries),
            max_queries=max(self.cfg.fwd_max_queries, job.queries),
            threshold=self.cfg.fwd_threshold,
            candidates=self.cfg.fwd_candidates,
            prior=self.prior,
            exact_restore=True,
        )

    def aggregate(self, rnd: int, updates: list[tuple[int, Any]]) -> Any:
        """FedAvg of the replayed deltas; remember the global step as the next prior."""
        before = torch.cat([v.flatten() for v in self.state.values()])
        result = super().aggregate(rnd, updates)
        step = torch.cat([v.flatten() for v in self.state.values()]) - before
        if result.accepted and step.norm() > 0:
            self.prior = step
        return result

    def state_dict(self) -> dict[str, torch.Tensor]:
        """FedIT's state plus the prior direction."""
        out = super().state_dict()
        if self.prior is not None:
            out["prior"] = self.prior
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore FedIT's state and the prior."""
        super().load_state_dict({k: v for k, v in state.items() if k != "prior"})
        self.prior = state["prior"].clone() if "prior" in state else None
