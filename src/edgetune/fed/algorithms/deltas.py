"""The server and client halves every adapter-averaging algorithm shares (FedIT, FwdLLM,
FedSpine hold one; none inherits from another).

`DeltaServer` keeps the global adapter tensors. Each round it broadcasts them (a
rank-r client gets their first r components, or whatever part its `shapes` function
gives: FedSpine's kept units), and aggregates the clients' deltas delta_c = theta_c -
theta with their example counts n_c. ZO devices send only their seeds and coefficients
(`SeedTrace`); the server replays them into delta_c (bit-exact) and aggregates both
kinds. Each update is checked against exactly the shapes its client's plan gave it, and
deltas are combined coordinate by coordinate over the clients that hold each one, or by
SVD re-projection (`fed.rank_aggregation`, see `edgetune.fed.hetlora`), with
delta = sum_c n_c delta_c / sum_c n_c or a robust rule. A server optimizer then applies
it (Reddi et al., "Adaptive Federated Optimization", 2021):

    fedavg:  theta += eta * delta
    fedavgm: m = beta m + delta;                      theta += eta * m
    fedadam: m = b1 m + (1-b1) delta; v = b2 v + (1-b2) delta^2;   theta += eta m/(sqrt(v)+tau)
    fedyogi: as fedadam with v = v - (1-b2) delta^2 sign(v - delta^2)

`train_delta` is the client half: load the broadcast at its rank, train, return the
delta (first-order) or the replayable `SeedTrace` (ZO); under local DP (`dp.where=device`)
`release` turns either into the clipped, noised delta the device sends. `DeltaAlgorithm` is the server
side of an algorithm built on a `DeltaServer` (FedIT and FwdLLM differ only in their
clients); it is not an algorithm itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from edgetune.fed.aggregate import (
    bucket_means,
    centered_clip,
    clip_scale,
    combine,
    median,
    trimmed_mean,
    weighted_mean,
)
from edgetune.fed.algorithms.base import (
    AggregateResult,
    StandardRoles,
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
from edgetune.train.config import backpropagates
from edgetune.zo.directions import add_direction
from edgetune.zo.seeds import Stream, generator, stream_seed

_BETA2, _TAU = 0.99, 1e-3
SERVER_SETTINGS = (  # the fed settings a DeltaServer reads (beside the aggregator's)
    "server_optimizer",
    "server_lr",
    "server_momentum",
    "ranks",
    "rank_aggregation",
    "max_update_norm",
    "bucket",
)


class DeltaServer:
    """Global adapter tensors, robust aggregation of deltas and the server optimizer."""

    def __init__(
        self,
        fed: Any,
        adapter: Adapter,
        shapes: Callable[[Any], IndexMap] | None = None,
        privacy: Any = None,
        seed: int = 0,
    ):
        """`fed` is the run's `fed` section; `shapes(plan)` gives the part of the global
        tensors a plan's client holds (default: a rank prefix, `rank_prefix`); with
        `privacy` (fed.dp), deltas are clipped and noised (`fed/privacy.py`)."""
        self.cfg = fed
        self.privacy = privacy
        self.seed = seed  # the run seed: bucketing's shuffle
        self.state = trainable_state(adapter)
        self.rank = tensors_rank(self.state)  # global LoRA rank R (None: not LoRA)
        self.axes = lora_axes(adapter)  # each tensor's named axes (rank, in, out)
        self.shapes = shapes or self.rank_prefix
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.center: torch.Tensor | None = None  # centered clipping: the last aggregate

    def rank_prefix(self, plan: Any) -> IndexMap:
        """The first `plan.rank` components of every LoRA tensor (all: no plan or rank)."""
        return IndexMap.rank_prefix(self.axes, self.state, plan.rank if plan else None)

    def broadcast(self, plan: Any) -> LoraDelta:
        """The global adapter tensors the plan's client holds."""
        return LoraDelta(gather(self.state, self.shapes(plan)))

    def aggregate(
        self, updates: list[tuple[int, Any]], plans: Mapping[int, Any] | None = None, rnd: int = 0
    ) -> AggregateResult:
        """Validate each update against its client's plan (a client without one was
        planned the global shapes), combine (round `rnd`'s private mean under fed.dp), and
        apply the server optimizer."""
        plans = plans or {}
        maps = {c: self.shapes(plans.get(c)) for c, _ in updates}
        updates = [(client, self.as_delta(update, maps[client])) for client, update in updates]
        good, result = screen(updates, lambda client, u: self._check(u, maps[client]))
        if not good:
            return result
        if self.privacy is not None:  # every plan holds the whole adapter (fed.dp refuses ranks)
            delta = self.privacy.mean(rnd, [u.tensors for u in good])
            self._apply(delta)
            result.stats["delta_norm"] = norm(delta)
            return result
        if self.cfg.bucket > 1 or self.cfg.aggregator == "centered-clip":
            delta = self._whole(rnd, [u.tensors for u in good])
            self._apply(delta)
            result.stats["delta_norm"] = norm(delta)
            return result
        held = [maps[c] for c in result.accepted]
        scales = [1.0] * len(good)
        if self.cfg.aggregator == "clip-mean":
            scales = [clip_scale(norm(u.tensors), self.cfg.clip) for u in good]
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
        result.stats["delta_norm"] = norm(delta)
        return result

    def _whole(self, rnd: int, updates: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """A rule over whole updates (every one of the global shapes: fed.ranks is
        refused with these): bucket means first (fed.bucket), then the median, trimmed
        mean or centered clipping around the last aggregate (plain mean otherwise)."""
        names = list(self.state)
        vectors = [torch.cat([u[n].reshape(-1) for n in names]) for u in updates]
        if self.cfg.bucket > 1:
            gen = generator(stream_seed(self.seed, Stream.SELECT, rnd, self.cfg.bucket))
            vectors = bucket_means(vectors, self.cfg.bucket, gen)
        rule = self.cfg.aggregator
        if rule == "centered-clip":
            center = self.center if self.center is not None else torch.zeros_like(vectors[0])
            flat = self.center = centered_clip(vectors, center, self.cfg.clip)
        elif rule == "median":
            flat = median(vectors)
        elif rule == "trimmed-mean":
            flat = trimmed_mean(vectors, self.cfg.trim)
        else:
            flat = weighted_mean(vectors, [1.0] * len(vectors))
        out, offset = {}, 0
        for n in names:
            size = self.state[n].numel()
            out[n] = flat[offset : offset + size].reshape(self.state[n].shape)
            offset += size
        return out

    def as_delta(self, update: Any, imap: IndexMap) -> Any:
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
        bound = self.cfg.max_update_norm
        if self.privacy is not None and self.privacy.local:  # honest noise is large
            numel = sum(t.numel() for t in self.state.values())
            bound = max(bound, self.privacy.update_bound(numel))
        return check_shapes(update.tensors, self.state, imap) or check_delta(
            update, gather(self.state, imap), bound
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
        """Global tensors, server-optimizer moments (and the privacy secret)."""
        out = {f"state.{k}": v for k, v in self.state.items()}
        out.update({f"m.{k}": v for k, v in self.m.items()})
        out.update({f"v.{k}": v for k, v in self.v.items()})
        if self.privacy is not None:
            out.update(self.privacy.state_dict())
        if self.center is not None:
            out["cc.center"] = self.center
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from `state_dict` (other keys, of another version, are ignored)."""
        if self.privacy is not None:
            self.privacy.load_state_dict(state)
        if "cc.center" in state:
            self.center = state["cc.center"].clone()
        for prefix, target in (("state.", self.state), ("m.", self.m), ("v.", self.v)):
            target.update(
                {k[len(prefix) :]: v.clone() for k, v in state.items() if k.startswith(prefix)}
            )


class DeltaAlgorithm(StandardRoles):
    """An algorithm's server side on a `DeltaServer`; subclasses give `client_update`."""

    def __init__(self, fed: Any, adapter: Adapter, privacy: Any = None, seed: int = 0):
        """`fed` is the run's `fed` section; `privacy`: fed.dp's mechanism, or None;
        `seed`: the run seed."""
        self.server = DeltaServer(fed, adapter, privacy=privacy, seed=seed)

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The global adapter tensors."""
        return self.server.state

    def configure(self, rnd: int, plan: Any) -> LoraDelta:
        """Broadcast the global adapter tensors the plan's client holds."""
        return self.server.broadcast(plan)

    def forget(self, client: int) -> None:
        """Nothing: the broadcast does not depend on what a client holds."""

    def client_update(
        self, adapter: Adapter, payload: Any, job: ClientJob, state: ClientState | None
    ) -> tuple[Any, ClientState | None]:
        raise NotImplementedError

    @property
    def device_privacy(self) -> Any:
        """fed.dp's mechanism when the devices add the noise (dp.where=device), else None."""
        privacy = self.server.privacy
        return privacy if privacy is not None and privacy.local else None

    def aggregate(
        self, rnd: int, updates: list[tuple[int, Any]], plans: Mapping[int, Any] | None = None
    ) -> AggregateResult:
        """Validate, combine and apply (`DeltaServer.aggregate`)."""
        return self.server.aggregate(updates, plans, rnd)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Global tensors and server-optimizer moments."""
        return self.server.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from `state_dict`."""
        self.server.load_state_dict(state)


def train_delta(adapter: Adapter, payload: Any, job: ClientJob, estimator: Any = None) -> Any:
    """Train from the broadcast tensors at the rank the server sent. Backprop clients
    return the delta theta_local - theta_global; ZO clients return their `SeedTrace`
    (16 bytes per direction), which the server replays into the same delta. `estimator`
    replaces the job's default MeZO / P-RGE (None: keep it)."""
    rank = tensors_rank(payload.tensors)
    with at_rank(adapter, rank):
        load_trainable(adapter, payload.tensors)
        results = job.run(adapter, estimator)
        loss = sum(r.loss for r in results) / max(len(results), 1)
        if not backpropagates(job.method):
            return seed_trace(results, job.lr, len(job.rows), loss)
        local = trainable_state(adapter)
    delta = {k: local[k] - payload.tensors[k] for k in local}
    return LoraDelta(delta, num_examples=len(job.rows), meta={"loss": loss})


DEVICE_SECRET = "dp.device_secret"  # a client state tensor (not an adapter name)


def release(
    privacy: Any, update: Any, adapter: Adapter, payload: Any, job: ClientJob, state: Any
) -> tuple[LoraDelta, torch.Tensor]:
    """Under local DP: the update as the device sends it (clipped and noised, from the
    device's own secret) and the secret for it to keep (`DEVICE_SECRET`). A ZO device's
    `SeedTrace` becomes the delta its steps made (the adapter still holds them): a trace
    is replayed exactly, so it cannot carry noise."""
    if isinstance(update, SeedTrace):
        local = trainable_state(adapter)
        tensors = {k: local[k] - payload.tensors[k] for k in local}
        update = LoraDelta(tensors, update.num_examples, update.meta)
    held = state.tensors.get(DEVICE_SECRET) if state is not None else None
    if held is not None:  # 62 bits as two int32 halves (a client state has no int64)
        value = (int(held[0]) << 31) | int(held[1])
    else:
        value = privacy.device_secret(job.client)
    secret = torch.tensor([value >> 31, value & (2**31 - 1)], dtype=torch.int32)
    seed = stream_seed(privacy.run_seed, Stream.DP_DEVICE, value, job.round)
    noised = privacy.privatize(update.tensors, seed)
    return LoraDelta(noised, update.num_examples, update.meta), secret


def norm(tensors: dict[str, torch.Tensor]) -> float:
    """The L2 norm over every tensor, in float64."""
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
