"""FwdLLM: federated forward-gradient fine-tuning with variance control.

Xu et al., "FwdLLM: Efficient FedLLM using Forward Gradient" (2023). Clients never
backpropagate: each local step is a forward-gradient estimate whose number of directions
is set by its variance (`ForwardGradientEstimator`), and directions are chosen to agree
with the previous global update (discriminative sampling: of `fwd_candidates` seeds per
draw, the one whose z is most aligned with the last global delta). Clients upload the
seeds and coefficients of their steps (`SeedTrace`); the server replays them into deltas
and averages them as FedIT does (FwdLLM's server is FedAvg on the PEFT parameters).

The prior is the global step since the last broadcast a device received, when that was
the previous round: a device keeps the previous global adapter (Flower context state), so
the prior costs no extra bytes. The simulator applies the same rule with the server's
copy of the previous global (`configure` + `prepare`); a device that skipped a round
samples without a prior.
"""

from __future__ import annotations

from typing import Any

import torch

from edgetune.fed.algorithms.fedit import FedIT
from edgetune.fed.hetlora import truncate_state
from edgetune.fed.local import ClientJob
from edgetune.peft import Adapter
from edgetune.zo.fwdgrad import ForwardGradientEstimator


class FwdLLM(FedIT):
    """FedIT's server with forward-gradient clients."""

    name = "fwdllm"

    def __init__(self, cfg: Any, adapter: Adapter, seed: int, lr: float):
        super().__init__(cfg, adapter, seed, lr)
        self.prior: torch.Tensor | None = None  # client: the direction to steer towards
        self.last_state: dict[str, torch.Tensor] | None = None  # global one round ago
        self.received: dict[int, int] = {}  # client -> last round it got the broadcast
        self._base: dict[str, torch.Tensor] | None = None

    def configure(self, rnd: int, rank: int | None = None, client: int | None = None) -> Any:
        """FedIT's broadcast; remembers what this client held (for `prepare`)."""
        payload = super().configure(rnd, rank, client)
        held = client is not None and self.received.get(client) == rnd - 1
        self._base = truncate_state(self.last_state, rank) if held and self.last_state else None
        if client is not None:
            self.received[client] = rnd
        return payload

    def prepare(self, adapter: Adapter, payload: Any) -> None:
        """Simulator: the prior from the previous global this client held."""
        self.set_prior(payload.tensors, self._base)

    def set_prior(
        self, tensors: dict[str, torch.Tensor], held: dict[str, torch.Tensor] | None
    ) -> None:
        """prior = broadcast - previous broadcast (None without one, or if equal)."""
        self.prior = None
        if held is None or held.keys() != tensors.keys():
            return
        if any(held[k].shape != t.shape for k, t in tensors.items()):
            return
        step = torch.cat([(t - held[k]).flatten() for k, t in tensors.items()])
        if step.norm() > 0:
            self.prior = step

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
        """FedAvg of the replayed deltas; keeps the global it started from."""
        self.last_state = {k: v.clone() for k, v in self.state.items()}
        return super().aggregate(rnd, updates)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """FedIT's state, the previous global and who received which round."""
        out = super().state_dict()
        if self.last_state is not None:
            out.update({f"last.{k}": v for k, v in self.last_state.items()})
        out["received"] = torch.tensor(sorted(self.received.items()), dtype=torch.int64).reshape(
            -1, 2
        )
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore FedIT's state, the previous global and the receipts."""
        super().load_state_dict(state)
        last = {k[5:]: v.clone() for k, v in state.items() if k.startswith("last.")}
        self.last_state = {k: last[k] for k in self.state} if last else None
        self.received = {int(c): int(r) for c, r in state["received"].tolist()}
