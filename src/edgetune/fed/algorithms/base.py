"""The shape every federated algorithm has; the round loop (`fed/rounds.py`) and the
devices call only this.

    configure(round, plan)                         -> payload for a selected client
    client_update(adapter, payload, job, state)    -> (update, state): runs on the client
    aggregate(round, [(client, update)], plans)    -> AggregateResult (new global inside)
    forget(client)                                 -> the server no longer knows what
                                                      this client holds (it restarted)
    planner(fed) / evaluate(fed, progress)         -> how its rounds are planned and its
                                                      global state scored
    deploy(fed, out, adapter_dir)                  -> what each device class deploys

A client's `state` is what its device keeps between rounds (`ClientState`, or None):
the simulator keeps it in a dict (and its checkpoint), a Flower SuperNode in its context.
`plans` are the `ClientPlan`s the round gave the clients: each update is validated
against the shapes its own plan gave it. Algorithms hold the server's global adapter
tensors. Payloads and updates are the typed values of `edgetune.fed.payloads`;
transports serialize them with `encode`.

`StandardRoles` gives the last three their usual meaning (the static planner, the
global adapter on the full model, nothing to deploy beyond the adapter); an algorithm
that plans or evaluates otherwise (FedSpine) defines its own. What the rest of edgetune
knows about an algorithm (its settings, whether its clients backpropagate, what they
upload) is its `AlgorithmSpec` in `registry.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from edgetune.errors import EdgetuneError
from edgetune.fed.local import ClientJob
from edgetune.fed.payloads import ClientState, Payload
from edgetune.fed.plan import Planner, StaticPlanner
from edgetune.peft import Adapter


@dataclass
class AggregateResult:
    """What a round's aggregation did."""

    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


class FedAlgorithm(Protocol):
    """A transport-agnostic federated algorithm."""

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The global adapter tensors (what the round loop loads into the adapter)."""
        ...

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

    def planner(self, fed: Any) -> Planner: ...

    def evaluate(self, fed: Any, progress: bool = False) -> dict[str, float]: ...

    def deploy(self, fed: Any, out: Path, adapter_dir: Path) -> dict[str, dict[str, Any]]: ...


class StandardRoles:
    """The usual planner, evaluation and deployment (see the module docstring)."""

    def planner(self, fed: Any) -> Planner:
        """Method by memory (zo for a forward-only algorithm's clients), rank by profile
        or list, the same every round."""
        cfg = fed.cfg
        forward_only = fed.algorithm.forward_only
        share = fed.backprop_share
        return StaticPlanner(cfg.fed, cfg.peft.rank, fed.num_params, forward_only, share)

    def evaluate(self, fed: Any, progress: bool = False) -> dict[str, float]:
        """The global adapter (as loaded in `fed.adapter`) on the held-out rows."""
        return fed.evaluate(progress)

    def deploy(self, fed: Any, out: Path, adapter_dir: Path) -> dict[str, dict[str, Any]]:
        """Nothing beyond the global adapter, which every device deploys."""
        del fed, out, adapter_dir
        return {}


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


def rounds_held(held_round: int, first_round: int, rounds: int) -> int:
    """How many of a catch-up broadcast's `rounds` (from `first_round` on) a client that
    holds the model of `held_round` has already applied: the ones it skips.

    Raises:
        EdgetuneError: the held model is older than the broadcast's first round, or newer
            than its last.
    """
    skip = held_round - first_round
    if not 0 <= skip <= rounds:
        raise EdgetuneError(
            f"client holds the model of round {held_round} but the broadcast covers "
            f"rounds {first_round}..{first_round + rounds}"
        )
    return skip
