"""A toy federated algorithm, written as a plugin would be: one module that registers
itself (the tests import it, or load it through an `edgetune.algorithms` entry point).

`toy-sign` is signSGD with majority vote over LoRA deltas: clients train first-order
(or send replayable seed traces), the server moves every coordinate by
fed.server_lr x STEP in the direction most clients moved it.
"""

from __future__ import annotations

from typing import Any

import torch

from edgetune.fed.algorithms.base import screen
from edgetune.fed.algorithms.deltas import DeltaAlgorithm, train_delta
from edgetune.fed.algorithms.registry import ALGORITHMS, AlgorithmSpec, register
from edgetune.fed.payloads import LoraDelta

NAME = "toy-sign"
STEP = 1e-3


class ToySign(DeltaAlgorithm):
    """Majority-vote signSGD on the global adapter (the broadcast and checkpoint are a
    DeltaServer's; only the client's update and the aggregation are the toy's own)."""

    def __init__(self, fed: Any, adapter: Any):
        super().__init__(fed, adapter)
        self.step = fed.server_lr * STEP

    def client_update(self, adapter, payload, job, state):
        return train_delta(adapter, payload, job), None

    def aggregate(self, rnd, updates, plans=None):
        deltas = [(c, self.server.as_delta(u, self.server.shapes(None))) for c, u in updates]
        good, result = screen(deltas, lambda c, u: _reason(u, self.state))
        if good:
            for name in self.state:
                vote = sum(torch.sign(u.tensors[name]) for u in good)
                self.state[name] = self.state[name] + self.step * torch.sign(vote)
        return result


def _reason(update: Any, state: dict[str, torch.Tensor]) -> str | None:
    if not isinstance(update, LoraDelta) or update.tensors.keys() != state.keys():
        return "not a full LoRA delta"
    if any(t.shape != state[n].shape for n, t in update.tensors.items()):
        return "shapes differ from the global adapter"
    if not all(bool(torch.isfinite(t).all()) for t in update.tensors.values()):
        return "non-finite values"
    return None


if NAME not in ALGORITHMS:
    register(
        AlgorithmSpec(
            name=NAME,
            build=lambda setup: ToySign(setup.fed, setup.adapter),
            help="test plugin: majority-vote signSGD over LoRA deltas",
            settings=("server_lr",),
        )
    )
