"""FedIT: federated instruction tuning = FedAvg over LoRA adapters.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning" (2023).
Each round the server broadcasts the global adapter tensors theta; client c trains
locally and returns delta_c = theta_c - theta with its example count n_c. Hybrid fleets:
devices that cannot backprop train with ZO and send only their seeds and coefficients
(`SeedTrace`); the server replays them into delta_c (bit-exact) and aggregates both kinds. The server
aggregates delta = sum_c n_c delta_c / sum_c n_c (or a robust rule) and applies a server
optimizer. Clients may train different LoRA ranks (`fed.ranks`, or the round's plan):
each gets the first r_c components of the global adapter (an `IndexMap`,
`edgetune.fed.shapes`), its update is checked against exactly those shapes, and deltas
are combined coordinate by coordinate over the clients that hold each one, or by SVD
re-projection (`fed.rank_aggregation`, see `edgetune.fed.hetlora`). The server
optimizer (Reddi et al., "Adaptive Federated Optimization", 2021):

    fedavg:  theta += eta * delta
    fedavgm: m = beta m + delta;                      theta += eta * m
    fedadam: m = b1 m + (1-b1) delta; v = b2 v + (1-b2) delta^2;   theta += eta m/(sqrt(v)+tau)
    fedyogi: as fedadam with v = v - (1-b2) delta^2 sign(v - delta^2)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from edgetune.fed.aggregate import clip_scale, combine
from edgetune.fed.algorithms.base import (
    AggregateResult,
    load_trainable,
    screen,
    trainable_state,
)
from edgetune.fed.hetlora import at_rank, svd_states, tensors_rank
from edgetune.fed.local import ClientJob
from edgetune.fed.payloads import ClientState, LoraDelta, SeedTrace
from edgetune.fed.shapes import IndexMap, check_shapes, gather, lora_axes, scatter_combine
from edgetune.fed.validate import check_delta, check_seed_trace
from edgetune.peft import Adapter
from edgetune.zo.directions import add_direction

_BETA2, _TAU = 0.99, 1e-3


class FedIT:
    """FedAvg of LoRA deltas with optional server optimizers and robust aggregation."""

    name = "fedit"
    FORWARD_ONLY: ClassVar[bool] = False  # clients never backpropagate
    FED_SETTINGS: ClassVar[tuple[str, ...]] = (
        "server_optimizer",
        "server_lr",
        "server_momentum",
        "ranks",
        "rank_aggregation",
        "max_update_norm",
    )

    def __init__(self, cfg: Any, adapter: Adapter, seed: int, lr: float):
        """`lr` is the run's client learning rate (one constructor for every algorithm;
        FedIT's deltas already contain their steps, so its server does not use it)."""
        self.cfg = cfg
        self.state = trainable_state(adapter)
        self.rank = tensors_rank(self.state)  # global LoRA rank R (None: not LoRA)
        self.axes = lora_axes(adapter)  # each tensor's named axes (rank, in, out)
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def shapes(self, plan: Any) -> IndexMap:
        """The part of the global tensors `plan` gives its client (a rank prefix)."""
        return IndexMap.rank_prefix(self.axes, self.state, plan.rank if plan else None)

    def configure(self, rnd: int, plan: Any) -> LoraDelta:
        """Broadcast the global adapter tensors (a rank-r client gets their first r
        components)."""
        return LoraDelta(gather(self.state, self.shapes(plan)))

    def forget(self, client: int) -> None:
        """Nothing: the broadcast does not depend on what a client holds."""

    def client_update(
        self, adapter: Adapter, payload: Any, job: ClientJob, state: ClientState | None
    ) -> tuple[Any, ClientState | None]:
        """Load the global tensors and train locally; FedIT clients keep no state."""
        return self.train(adapter, payload, job, None), None

    def train(self, adapter: Adapter, payload: Any, job: ClientJob, estimator: Any) -> Any:
        """Train from the broadcast tensors at the rank the server sent. Backprop
        clients return the delta theta_local - theta_global; ZO clients return their
        `SeedTrace` (16 bytes per direction), which the server replays into the same
        delta. `estimator` replaces the job's default MeZO / P-RGE (None: keep it)."""
        rank = tensors_rank(payload.tensors)
        with at_rank(adapter, rank):
            load_trainable(adapter, payload.tensors)
            results = job.run(adapter, estimator)
            loss = sum(r.loss for r in results) / max(len(results), 1)
            if job.method != "fo":
                return seed_trace(results, job.lr, len(job.rows), loss)
            local = trainable_state(adapter)
        delta = {k: local[k] - payload.tensors[k] for k in local}
        return LoraDelta(delta, num_examples=len(job.rows), meta={"loss": loss})

    def aggregate(
        self, rnd: int, updates: list[tuple[int, Any]], plans: Mapping[int, Any] | None = None
    ) -> AggregateResult:
        """Validate each update against its client's plan (a client without one was
        planned the global shapes), combine, and apply the server optimizer."""
        plans = plans or {}
        maps = {c: self.shapes(plans.get(c)) for c, _ in updates}
        updates = [(client, self._as_delta(update, maps[client])) for client, update in updates]
        good, result = screen(updates, lambda client, u: self._check(u, maps[client]))
        if not good:
            return result
        held = [maps[c] for c in result.accepted]
        scales = [1.0] * len(good)
        if self.cfg.aggregator == "clip-mean":
            scales = [clip_scale(_norm(u.tensors), self.cfg.clip) for u in good]
        weights = [float(u.num_examples) for u in good]
        deltas = [
            {n: t * s for n, t in u.tensors.items()} for u, s in zip(good, scales, strict=True)
        ]
        if self.cfg.rank_aggregation == "svd" and self.rank is not None:
            new = svd_states(self.state, deltas, weights)
            delta = {n: new[n] - self.state[n] for n in self.state}
        else:
            rule, trim = self.cfg.aggregator, self.cfg.trim
            delta = scatter_combine(
                self.state,
                list(zip(deltas, held, strict=True)),
                weights,
                lambda v, w: combine(v, w, rule, trim),
            )
        self._apply(delta)
        result.stats["delta_norm"] = _norm(delta)
        return result

    def _as_delta(self, update: Any, imap: IndexMap) -> Any:
        """Replay a valid SeedTrace into a LoraDelta of the client's planned shapes;
        anything else is returned as is."""
        if not isinstance(update, SeedTrace) or check_seed_trace(update, None) is not None:
            return update
        start = gather(self.state, imap)
        names = list(start)
        params = [start[n].clone() for n in names]
        for seed, coef in zip(update.seeds, update.coefs, strict=True):
            add_direction(params, seed, -coef)
        delta = {n: p - start[n] for n, p in zip(names, params, strict=True)}
        return LoraDelta(delta, update.num_examples, {**update.meta, "replayed": 1.0})

    def _check(self, update: Any, imap: IndexMap) -> str | None:
        """The reason `update` is not a valid delta of the shapes planned for its client,
        or None."""
        if isinstance(update, SeedTrace):
            return check_seed_trace(update, None) or "not a LoRA delta"
        if not isinstance(update, LoraDelta):
            return "not a LoRA delta or seed trace"
        return check_shapes(update.tensors, self.state, imap) or check_delta(
            update, gather(self.state, imap), self.cfg.max_update_norm
        )

    def _apply(self, delta: dict[str, torch.Tensor]) -> None:
        opt, eta, beta = self.cfg.server_optimizer, self.cfg.server_lr, self.cfg.server_momentum
        for name, d in delta.items():
            if opt == "fedavg":
                step = d
            elif opt == "fedavgm":
                m = self.m.setdefault(name, torch.zeros_like(d))
                m.mul_(beta).add_(d)
                step = m
            else:
                m = self.m.setdefault(name, torch.zeros_like(d))
                v = self.v.setdefault(name, torch.zeros_like(d))
                m.mul_(beta).add_(d, alpha=1 - beta)
                d2 = d * d
                if opt == "fedadam":
                    v.mul_(_BETA2).add_(d2, alpha=1 - _BETA2)
                else:
                    v.sub_((1 - _BETA2) * d2 * torch.sign(v - d2))
                step = m / (v.sqrt() + _TAU)
            self.state[name] = self.state[name] + eta * step

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Global tensors and server-optimizer moments."""
        out = {f"state.{k}": v for k, v in self.state.items()}
        out.update({f"m.{k}": v for k, v in self.m.items()})
        out.update({f"v.{k}": v for k, v in self.v.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from `state_dict` (other keys, of another version, are ignored)."""
        for prefix, target in (("state.", self.state), ("m.", self.m), ("v.", self.v)):
            target.update(
                {k[len(prefix) :]: v.clone() for k, v in state.items() if k.startswith(prefix)}
            )


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def seed_trace(results: list[Any], lr: float, num_examples: int, loss: float) -> SeedTrace:
    """The SeedTrace of ZO-SGD steps: coefficient lr * c / q per direction, exactly the
    value `apply_estimate` used, so replaying it reproduces the client's adapter."""
    seeds: list[int] = []
    coefs: list[float] = []
    for r in results:
        q = len(r.estimate.seeds)
        seeds.extend(r.estimate.seeds)
        coefs.extend(lr * c / q for c in r.estimate.scalars)
    return SeedTrace(seeds, coefs, num_examples, {"loss": loss})
