"""The shape every federated algorithm has; the round loop (`fed/rounds.py`) and the
devices call only this.

    configure(round, plan)                         -> payload for a selected client
    client_update(adapter, payload, job, state)    -> (update, state): runs on the client
    aggregate(round, [(client, update)], plans)    -> AggregateResult (new global inside)
    forget(client)                                 -> the server no longer knows what
                                                      this client holds (it restarted)

A client's `state` is what its device keeps between rounds (`ClientState`, or None):
the simulator keeps it in a dict (and its checkpoint), a Flower SuperNode in its context.
`plans` are the `ClientPlan`s the round gave the clients: each update is validated
against the shapes its own plan gave it. Algorithms hold the server's global adapter
tensors. Payloads and updates are the typed values of `edgetune.fed.payloads`;
transports serialize them with `encode`.

Each algorithm lists the `fed` settings it reads in `FED_SETTINGS` (beside the shared
ones: fleet, rounds, selection, aggregator); the others are refused when given.
`FORWARD_ONLY` says its clients never backpropagate (the planner gives them zo). The
registry (`edgetune.fed.algorithms.ALGORITHMS`) is the one list of algorithms.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from edgetune.fed.local import ClientJob
from edgetune.fed.payloads import ClientState, Payload
from edgetune.peft import Adapter


@dataclass
class AggregateResult:
    """What a round's aggregation did."""

    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


class FedAlgorithm(Protocol):
    """A transport-agnostic federated algorithm."""

    name: str
    state: dict[str, torch.Tensor]
    FED_SETTINGS: ClassVar[tuple[str, ...]]
    FORWARD_ONLY: ClassVar[bool]

    def configure(self, rnd: int, plan: Any) -> Payload: ...

    def client_update(
        self, adapter: Adapter, payload: Payload, job: ClientJob, state: ClientState | None
    ) -> tuple[Payload, ClientState | None]: ...

    def aggregate(
        self, rnd: int, updates: list[tuple[int, Any]], plans: Mapping[int, Any] | None = None
    ) -> AggregateResult: ...

    def forget(self, client: int) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def screen(
    updates: list[tuple[int, Any]], check: Callable[[int, Any], str | None]
) -> tuple[list[Any], AggregateResult]:
    """Split updates into the valid ones and an AggregateResult naming the rejected.

    Args:
        updates: (client id, decoded update) pairs.
        check: (client, update) -> the reason the update is invalid, or None.
    """
    result = AggregateResult()
    good = []
    for client, update in updates:
        reason = check(client, update)
        if reason:
            result.rejected[client] = reason
        else:
            result.accepted.append(client)
            good.append(update)
    return good, result


def trainable_state(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's trainable tensors by name (cloned): the federated global state."""
    return {n: p.detach().clone() for n, p in zip(adapter.names, adapter.trainable(), strict=True)}


@torch.no_grad()
def load_trainable(adapter: Adapter, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the adapter's trainable tensors, in place."""
    for name, param in zip(adapter.names, adapter.trainable(), strict=True):
        param.copy_(state[name])
