"""FedIT: federated instruction tuning = FedAvg over LoRA adapters.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning" (2023).
Each round the server broadcasts the global adapter tensors theta; client c trains
locally and returns delta_c = theta_c - theta with its example count n_c; the server
aggregates delta = sum_c n_c delta_c / sum_c n_c (or a robust rule) and applies a server
optimizer (fedavg | fedavgm | fedadam | fedyogi). Hybrid fleets: devices that cannot
backprop train with ZO and send only their seeds and coefficients, which the server
replays. Clients may train different LoRA ranks (`fed.ranks`, or the round's plan). The
server and client halves are `deltas.py`'s, shared with FwdLLM and FedSpine.
"""

from __future__ import annotations

from typing import Any

from edgetune.fed.algorithms.deltas import (
    DEVICE_SECRET,
    SERVER_SETTINGS,
    DeltaAlgorithm,
    release,
    train_delta,
)
from edgetune.fed.algorithms.registry import AlgorithmSpec, register
from edgetune.fed.local import ClientJob
from edgetune.fed.payloads import ClientState
from edgetune.peft import Adapter


class FedIT(DeltaAlgorithm):
    """FedAvg of LoRA deltas with optional server optimizers and robust aggregation."""

    def client_update(
        self, adapter: Adapter, payload: Any, job: ClientJob, state: ClientState | None
    ) -> tuple[Any, ClientState | None]:
        """Load the global tensors and train locally; FedIT clients keep no state but
        their local-DP secret (dp.where=device)."""
        update = train_delta(adapter, payload, job)
        if self.device_privacy is None:
            return update, None
        update, secret = release(self.device_privacy, update, adapter, payload, job, state)
        return update, ClientState({DEVICE_SECRET: secret})


register(
    AlgorithmSpec(
        name="fedit",
        build=lambda setup: FedIT(setup.fed, setup.adapter, setup.privacy, setup.seed),
        help="FedAvg of LoRA deltas (first-order; ZO devices send replayable seed traces)",
        settings=SERVER_SETTINGS,
        private=True,
        private_on_device=True,
    )
)
