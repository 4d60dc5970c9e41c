"""What each selected client does in a round: its `ClientPlan`, decided by a planner.

The round loop (`fed/rounds.py`) asks the planner every round, for every selected
client, how it trains: the method (fo | zo | prge, or None when nothing fits its
memory) and the LoRA rank (None: the global rank). The planner sees the device profiles
(declared by the devices themselves on Flower) and the history of earlier rounds (every
client entry logged so far), so a planner may adapt a client's plan from round to round;
the algorithm then configures that client's payload for its plan, and validates its
update against the shapes the plan gave it.

`StaticPlanner` is the default and today's rule: the method by memory (`fed.method`,
forward-only algorithms never backprop) and the rank by profile or list (`fed.ranks`),
the same every round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from edgetune.fed.fleet import DeviceProfile, choose_method, client_ranks
from edgetune.train.memory import method_memory_mb


class Outcome(StrEnum):
    """How a planned client's round ended: the `status` of its clients.jsonl entry, which
    planners read back from the history (a rejected update's status adds the reason)."""

    OK = "ok"
    NO_METHOD = "no method fits its memory"
    UNAVAILABLE = "unavailable"
    DROPPED = "dropped mid-round"
    LATE = "missed the deadline"


@dataclass(frozen=True)
class ClientPlan:
    """How one client trains in one round."""

    client: int
    device: DeviceProfile
    method: str | None  # fo | zo | prge; None: no method fits its memory
    rank: int | None = None  # LoRA rank it trains (None: the global rank)
    ratio: float | None = None  # pruning ratio of its sub-model (None: the full model)
    params: int | None = None  # parameters of the model it runs (None: the full model)
    arm: int | None = None  # the arm its planner chose (FedSpine's bandit)

    def control(self) -> dict[str, Any]:
        """The plan as the few scalars that travel with a client's payload."""
        return {"method": self.method or "", "rank": self.rank or 0}

    @staticmethod
    def from_control(client: int, device: DeviceProfile, control: Any) -> ClientPlan:
        """The plan a device received (`control`: a mapping with method and rank)."""
        return ClientPlan(
            client, device, str(control["method"]) or None, int(control["rank"]) or None
        )


class Planner(Protocol):
    """Decides the plans of a round's selected clients."""

    def plan(
        self,
        rnd: int,
        clients: Sequence[int],
        profiles: Sequence[DeviceProfile],
        history: Sequence[dict[str, Any]],
    ) -> dict[int, ClientPlan]:
        """Plans for `clients` in round `rnd` (0-based), given every client's profile
        and the client entries of the rounds before."""
        ...


class StaticPlanner:
    """Today's rule, the same every round: method by memory, rank by profile or list."""

    def __init__(
        self,
        fed: Any,
        global_rank: int,
        num_params: int,
        forward_only: bool,
        backprop_share: float = 1.0,
    ):
        """`fed` is the run's `fed` section (method, ranks); `forward_only`: the
        algorithm's clients never backpropagate, so a device that fits gets zo;
        `backprop_share`: the fraction of the blocks a first-order client backpropagates
        through (LoRA on the top K blocks), which sets what fo costs."""
        self.fed, self.global_rank = fed, global_rank
        self.num_params, self.forward_only = num_params, forward_only
        self.backprop_share = backprop_share

    def plan(
        self,
        rnd: int,
        clients: Sequence[int],
        profiles: Sequence[DeviceProfile],
        history: Sequence[dict[str, Any]],
    ) -> dict[int, ClientPlan]:
        """Each client's method (the cheapest that fits its memory under `fed.method`)
        and LoRA rank (`fed.ranks`)."""
        del rnd, history
        ranks = client_ranks(self.fed.ranks, list(profiles), self.global_rank)
        plans = {}
        for client in clients:
            method = choose_method(
                profiles[client], self.num_params, self.fed.method, self.backprop_share
            )
            if method is not None and self.forward_only:
                method = "zo"
            plans[client] = ClientPlan(client, profiles[client], method, ranks[client])
        return plans

    def methods(self, profiles: Sequence[DeviceProfile]) -> list[str | None]:
        """Every client's method (for the summary's method counts)."""
        plans = self.plan(0, range(len(profiles)), profiles, [])
        return [plans[c].method for c in range(len(profiles))]


def plan_memory_mb(plan: ClientPlan, num_params: int, backprop_share: float = 1.0) -> float | None:
    """The memory estimate the method choice used (None without a method); `num_params`
    is the full model's, for a plan that runs the full model."""
    if not plan.method:
        return None
    return round(method_memory_mb(plan.params or num_params, plan.method, backprop_share), 1)
