"""The shape every federated algorithm has; transports (simulator, Flower) call only this.

    configure(round, rank, client)            -> payload for a selected client (of a LoRA rank)
    prepare(adapter, payload)                 -> simulator only: load what the client holds
    client_update(adapter, payload, job)      -> the client's update (runs on the client)
    aggregate(round, [(client, update), ...]) -> AggregateResult (new global state inside)

Algorithms hold the server's global adapter tensors. Payloads and updates are the typed
values of `edgetune.fed.payloads`; transports serialize them with `encode`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from edgetune.fed.local import ClientJob
from edgetune.fed.payloads import Payload
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

    def configure(
        self, rnd: int, rank: int | None = None, client: int | None = None
    ) -> Payload: ...

    def prepare(self, adapter: Adapter, payload: Payload) -> None: ...

    def client_update(self, adapter: Adapter, payload: Payload, job: ClientJob) -> Payload: ...

    def aggregate(self, rnd: int, updates: list[tuple[int, Any]]) -> AggregateResult: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def screen(
    updates: list[tuple[int, Any]], check: Callable[[Any], str | None]
) -> tuple[list[Any], AggregateResult]:
    """Split updates into the valid ones and an AggregateResult naming the rejected.

    Args:
        updates: (client id, decoded update) pairs.
        check: returns the reason an update is invalid, or None.
    """
    result = AggregateResult()
    good = []
    for client, update in updates:
        reason = check(update)
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
