"""FedKSeed / FedKSeed-Pro: federated ZO with a finite pool of K shared seeds.

Qin et al., "Federated Full-Parameter Tuning of Billion-Sized Language Models with
Communication Cost under 18 Kilobytes" (2024). Every party knows the pool
s_0..s_{K-1} = derive(run seed, POOL, k). A client's local step picks an index k, takes
the two-point estimate c along z(s_k) and updates theta -= lr * c * z(s_k); it uploads only
the (k, c, lr) triples (`ZOTrace`, 12 bytes a step). The server accumulates per seed

    a_k = sum_c w_c * sum_{t of client c with index k} lr * clip(c_t)

and the new global model is theta' = theta - sum_k a_k z(s_k). The server keeps the
vector a of every round; a selected client gets the vectors of the rounds since it last
synced (`SeedScalars`, only the non-zero a_k travel) and replays them onto the model it
holds, which gives the global model exactly, because the replay is the same arithmetic in
the same order on every party. A device keeps that model between rounds (its
`ClientState`, with the round it reached and Pro's magnitudes); a device that holds
nothing starts from the initial adapter, and a server that sees a device restart
(`forget`) sends it every round again.

The server decides the learning rate: lr is the run's (`optim.lr`, passed to the
constructor), and a trace reporting any other lr is rejected (honest clients report
exactly the run's lr, so a different one is a forged or misconfigured client). A trace
with more steps than `fed.local_steps` is rejected too.

Aggregation rules (`fed.aggregator`) act on each client's scalar vector c_c (its T
scalars), since seeds are sparse (pool K ~ 1024, a client touches T ~ 5 seeds, so
clients rarely share one) and a per-seed median or trimmed mean over clients would be ~0
on every seed, or one client's own value:

    mean:         w_c = n_c / N, n_c the client's example count capped by the server;
    clip-mean:    as mean, each scalar clipped to +-fed.clip (a fixed bound);
    median:       clients whose ||c_c|| is an outlier of the round (log-space MAD, the
                  limit kept within 10x..100x the median) are rejected; the others are
                  scaled to at most the median norm and averaged, w_c = 1 / C: no
                  client moves the model more than a typical one (clipping at a bound
                  the data sets);
    trimmed-mean: the same screening, then the int(trim * C) largest-norm clients are
                  dropped and the rest averaged, w_c = 1 / C'.

Robust rules ignore example counts (a client cannot buy influence). A sign-flipped
trace of typical norm passes screening; its effect is bounded by the median norm (1/C of
the step each).

Pro samples k with probability proportional to the accumulated |a_k| seen so far (plus a
floor, so every seed stays possible): seeds that moved the model more are tried more.

A secret pool (`fed.secret_pool`): the public pool lets anyone who reads the scalars off
the wire (and knows the run's config) rebuild every client's update. With it, round r's
pool is derived from a round key instead of the run seed,

    key_r = derive(run seed, POOL_KEY, secret, r),   s_k^(r) = derive(key_r, POOL, k),

where the secret is the server's (made at the first start, kept in its checkpoint, never
in the config). A selected client receives the keys of the rounds it replays and of the
round it trains in, with the scalars (over Flower's TLS channel), never the secret: a
device that is no longer selected cannot derive later rounds' pools, and scalars or
traces read without their round's key replay into unrelated directions.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from edgetune.errors import ConfigError, EdgetuneError
from edgetune.fed.aggregate import check_bound, median_clip, norm_outliers
from edgetune.fed.algorithms.base import (
    AggregateResult,
    StandardRoles,
    load_trainable,
    rounds_held,
    screen,
    trainable_state,
)
from edgetune.fed.algorithms.registry import AlgorithmSetup, AlgorithmSpec, register
from edgetune.fed.local import ClientJob
from edgetune.fed.payloads import ClientState, SeedScalars, ZOTrace
from edgetune.fed.validate import check_trace
from edgetune.peft import Adapter
from edgetune.zo.directions import add_direction, loss_at, restore, snapshot
from edgetune.zo.estimate import LossFn, ZOEstimate
from edgetune.zo.seeds import Stream, generator, stream_seed


def seed_pool(run_seed: int, size: int) -> list[int]:
    """The K candidate seeds every party derives from the run seed."""
    return [stream_seed(run_seed, Stream.POOL, k) for k in range(size)]


@torch.no_grad()
def replay(params: Sequence[torch.Tensor], pool: list[int], scalars: list[float]) -> None:
    """theta <- theta - sum_k a_k z(s_k), in index order (skipping a_k == 0)."""
    for k, a in enumerate(scalars):
        if a != 0.0:
            add_direction(params, pool[k], -a)


@dataclass
class PoolEstimator:
    """MeZO with q = 1 along a seed drawn from the pool (uniform, or by `probs`)."""

    pool: list[int]
    eps: float
    probs: torch.Tensor | None = None

    def estimate(self, loss_fn: LossFn, params: list[torch.Tensor], step_seed: int) -> ZOEstimate:
        """Pick k from generator(step_seed), estimate along z(pool[k])."""
        gen = generator(step_seed)
        if self.probs is None:
            k = int(torch.randint(len(self.pool), (1,), generator=gen))
        else:
            k = int(torch.multinomial(self.probs, 1, generator=gen))
        saved = snapshot(params)
        plus = loss_at(loss_fn, params, self.pool[k], self.eps, saved)
        minus = loss_at(loss_fn, params, self.pool[k], -self.eps, saved)
        restore(params, saved)
        scalar = (plus - minus) / (2 * self.eps)
        return ZOEstimate([self.pool[k]], [scalar], 0.5 * (plus + minus), 2, {"index": k})


MAGNITUDE = "fedkseed.magnitude"  # the client state's Pro magnitudes (not an adapter name)


@dataclass
class HeldModel:
    """What a FedKSeed device holds: the global model of round `round`, and the summed
    |a_k| of the rounds it replayed (Pro's sampling weights)."""

    tensors: dict[str, torch.Tensor]
    round: int
    magnitude: torch.Tensor

    @staticmethod
    def from_state(
        state: ClientState | None, initial: dict[str, torch.Tensor], pool: int
    ) -> HeldModel:
        """The model a device's state holds (the initial adapter if none)."""
        if state is None:
            magnitude = torch.zeros(pool, dtype=torch.float64)
            return HeldModel({k: v.clone() for k, v in initial.items()}, 0, magnitude)
        tensors = {k: v for k, v in state.tensors.items() if k != MAGNITUDE}
        return HeldModel(tensors, int(state.values["round"]), state.tensors[MAGNITUDE].double())

    def to_state(self) -> ClientState:
        return ClientState(
            {**self.tensors, MAGNITUDE: self.magnitude}, {"round": float(self.round)}
        )


class FedKSeed(StandardRoles):
    """Seed-pool federated ZO (see the module docstring)."""

    def __init__(
        self,
        fed: Any,
        adapter: Adapter,
        seed: int,
        lr: float,
        pro: bool = False,
        privacy: Any = None,
    ):
        """`fed` is the run's `fed` section, `seed` the run seed (the pool), `lr` the
        clients' learning rate; `pro` samples seeds by their past magnitude; with
        `privacy` (fed.dp) each client's per-seed scalars are clipped and every seed's
        aggregate noised (`fed/privacy.py`)."""
        self.cfg = fed
        self.pro = pro
        self.privacy = privacy
        self.lr = lr  # the run's client lr: the server's, whatever a trace reports
        self.pool = seed_pool(seed, fed.pool_size)
        self.run_seed = seed
        # fed.secret_pool: the server's secret (replaced from its checkpoint on resume)
        self.secret = secrets.randbits(62) if fed.secret_pool else None
        self.state = trainable_state(adapter)
        self.initial = {k: v.clone() for k, v in self.state.items()}
        self.history: list[list[float]] = []  # a of every aggregated round
        self.synced: dict[int, int] = {}  # client -> round of the model it holds

    def round_key(self, rnd: int) -> int:
        """Round `rnd`'s pool key (a secret pool only)."""
        assert self.secret is not None
        return stream_seed(self.run_seed, Stream.POOL_KEY, self.secret, rnd)

    def server_pool(self, rnd: int) -> list[int]:
        """The pool round `rnd` trained with: the public one, or its round key's."""
        return self.pool if self.secret is None else seed_pool(self.round_key(rnd), len(self.pool))

    def configure(self, rnd: int, plan: Any) -> SeedScalars:
        """The scalars of every round since the plan's client last synced (with a secret
        pool, the keys of those rounds and of round `rnd`)."""
        since = self.synced.get(plan.client, 0)
        rounds = [list(a) for a in self.history[since:]]
        keys = []
        if self.secret is not None:  # history[r] is round r's; the client trains in `rnd`
            keys = [self.round_key(r) for r in range(since, len(self.history))]
            keys.append(self.round_key(rnd))
        return SeedScalars(rounds, since, len(self.pool), keys)

    def client_pools(self, payload: SeedScalars) -> list[list[int]]:
        """A client's pool for each round the broadcast covers and the round it trains
        in: the public pool, or the ones its round keys give.

        Raises:
            EdgetuneError: the broadcast's keys do not match the run's fed.secret_pool.
        """
        if self.cfg.secret_pool != bool(payload.keys):
            raise EdgetuneError(
                f"the server's broadcast {'has no' if self.cfg.secret_pool else 'has'} round "
                f"keys, but this device's config has fed.secret_pool={self.cfg.secret_pool}: "
                "the server and the devices must run the same config"
            )
        if not payload.keys:
            return [self.pool] * (len(payload.rounds) + 1)
        return [seed_pool(key, len(self.pool)) for key in payload.keys]

    def forget(self, client: int) -> None:
        """The client restarted and may hold any model: send it every round again."""
        self.synced.pop(client, None)

    def catch_up(self, adapter: Adapter, payload: SeedScalars, held: HeldModel) -> HeldModel:
        """Load the held model into `adapter` and replay the broadcast rounds it has not
        seen; returns the model it now holds (the global model of the last round).

        Raises:
            EdgetuneError: the held model is older than the broadcast's first round.
        """
        skip = rounds_held(held.round, payload.first_round, len(payload.rounds))
        load_trainable(adapter, held.tensors)
        magnitude = held.magnitude.clone()
        pools = self.client_pools(payload)
        for pool, scalars in zip(pools[skip:], payload.rounds[skip:], strict=False):
            replay(adapter.trainable(), pool, scalars)
            magnitude += torch.tensor([abs(a) for a in scalars], dtype=torch.float64)
        rnd = payload.first_round + len(payload.rounds)
        return HeldModel(trainable_state(adapter), rnd, magnitude)

    def probabilities(self, magnitude: torch.Tensor) -> torch.Tensor | None:
        """Pro: sampling probabilities from past |a_k| (None = uniform)."""
        if not self.pro or not magnitude.any():
            return None
        weights = magnitude + magnitude[magnitude > 0].mean() * 0.1
        return (weights / weights.sum()).float()

    def client_update(
        self, adapter: Adapter, payload: Any, job: ClientJob, state: ClientState | None
    ) -> tuple[ZOTrace, ClientState]:
        """Catch up by replaying the broadcast, keep that model, train with pool seeds,
        upload the trace."""
        held = self.catch_up(
            adapter, payload, HeldModel.from_state(state, self.initial, len(self.pool))
        )
        pool = self.client_pools(payload)[-1]  # this round's
        estimator = PoolEstimator(pool, job.zo.eps, self.probabilities(held.magnitude))
        results = job.run(adapter, estimator)
        trace = ZOTrace(
            indices=[int(r.estimate.extras["index"]) for r in results if r.estimate],
            scalars=[r.estimate.scalars[0] for r in results if r.estimate],
            lrs=[job.lr] * len(results),
            num_examples=len(job.rows),
            meta={"loss": sum(r.loss for r in results) / max(len(results), 1)},
        )
        return trace, held.to_state()

    def aggregate(
        self, rnd: int, updates: list[tuple[int, Any]], plans: Mapping[int, Any] | None = None
    ) -> AggregateResult:
        """Validate traces, accumulate a_k by the configured rule, move the global model
        by replay (every plan trains the whole adapter, so `plans` add no check)."""
        good, result = screen(updates, lambda client, u: self._check(u))
        acc = self.combine(good, result, rnd)
        params = list(self.state.values())
        replay(params, self.server_pool(rnd), acc)
        for client, _ in updates:  # every client that replied has replayed up to `rnd`
            self.synced[client] = rnd
        self.history.append(acc)
        result.stats["seeds_used"] = float(sum(1 for a in acc if a != 0.0))
        return result

    def combine(self, traces: list[ZOTrace], result: AggregateResult, rnd: int = 0) -> list[float]:
        """a_k under `fed.aggregator` (see the module docstring), or round `rnd`'s private
        mean under fed.dp; outliers screened by the robust rules move from
        `result.accepted` to `result.rejected`."""
        if self.privacy is not None:
            if not traces:
                return [0.0] * len(self.pool)
            vectors = [{"a": self.per_seed(t)} for t in traces]
            return (self.privacy.mean(rnd, vectors)["a"] * self.lr).tolist()
        rule = self.cfg.aggregator
        check_bound("clip", self.cfg.clip)
        if rule in ("median", "trimmed-mean"):
            norms = [math.sqrt(sum(c * c for c in t.scalars)) for t in traces]
            reasons = norm_outliers(norms)
            for client, reason in zip(list(result.accepted), reasons, strict=True):
                if reason:
                    result.accepted.remove(client)
                    result.rejected[client] = reason
            kept = [(t, n) for t, n, r in zip(traces, norms, reasons, strict=True) if not r]
            if rule == "trimmed-mean":
                kept.sort(key=lambda tn: tn[1])
                drop = int(self.cfg.trim * len(kept))
                result.stats["trimmed"] = float(drop)
                kept = kept[: len(kept) - drop]
            traces = [t for t, _ in kept]
            if not kept:
                return [0.0] * len(self.pool)
            factors = median_clip([n for _, n in kept]) if rule == "median" else [1.0] * len(kept)
            weights = [f / len(kept) for f in factors]
        else:
            total = sum(t.num_examples for t in traces)
            weights = [t.num_examples / total for t in traces]
        bound = self.cfg.clip if rule == "clip-mean" else math.inf
        acc = [0.0] * len(self.pool)
        for trace, weight in zip(traces, weights, strict=True):
            for k, c in zip(trace.indices, trace.scalars, strict=True):
                acc[k] += weight * self.lr * max(-bound, min(bound, c))
        return acc

    def per_seed(self, trace: ZOTrace) -> torch.Tensor:
        """A trace's summed scalar on each pool seed (a K-vector, float64)."""
        vector = torch.zeros(len(self.pool), dtype=torch.float64)
        for k, c in zip(trace.indices, trace.scalars, strict=True):
            vector[k] += c
        return vector

    def _check(self, update: Any) -> str | None:
        if not isinstance(update, ZOTrace):
            return "not a ZO trace"
        return check_trace(
            update, len(self.pool), self.cfg.max_abs_scalar, self.lr, self.cfg.local_steps
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Global and initial tensors, every round's scalars, and who synced when."""
        out = {f"state.{k}": v for k, v in self.state.items()}
        out.update({f"initial.{k}": v for k, v in self.initial.items()})
        out["history"] = torch.tensor(self.history, dtype=torch.float64).reshape(
            len(self.history), len(self.pool)
        )
        out["synced"] = torch.tensor(sorted(self.synced.items()), dtype=torch.int64).reshape(-1, 2)
        if self.privacy is not None:
            out.update(self.privacy.state_dict())
        if self.secret is not None:
            out["pool.secret"] = torch.tensor([self.secret], dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from `state_dict` (keys of older versions are ignored)."""
        # Keep the adapter's tensor order: directions are drawn tensor by tensor in it,
        # and a checkpoint file stores its keys sorted.
        self.state = {k: state[f"state.{k}"].clone() for k in self.state}
        self.initial = {k: state[f"initial.{k}"].clone() for k in self.state}
        self.history = state["history"].tolist()
        self.synced = {int(c): int(r) for c, r in state["synced"].tolist()}
        if self.privacy is not None:
            self.privacy.load_state_dict(state)
        if self.secret is not None and "pool.secret" in state:
            self.secret = int(state["pool.secret"][0])


def _builder(pro: bool) -> Callable[[AlgorithmSetup], FedKSeed]:
    def build(setup: AlgorithmSetup) -> FedKSeed:
        return FedKSeed(setup.fed, setup.adapter, setup.seed, setup.lr, pro, setup.privacy)

    return build


def _check_pro(cfg: Any) -> None:
    """Pro's sampling weights belong to seeds a secret pool replaces every round."""
    if cfg.fed.secret_pool:
        raise ConfigError(
            "fed.secret_pool draws new seeds every round, and fedkseed-pro samples seeds by "
            "the magnitude each gathered over past rounds; use fed.algorithm=fedkseed with "
            "it, or drop fed.secret_pool"
        )


for _name, _pro in (("fedkseed", False), ("fedkseed-pro", True)):
    register(
        AlgorithmSpec(
            name=_name,
            build=_builder(_pro),
            help="ZO clients over K shared seeds"
            + (", sampled by past magnitude" if _pro else "")
            + "; a few bytes a step up and down",
            settings=("pool_size", "max_abs_scalar", "secret_pool"),
            forward_only=True,
            uploads=(ZOTrace,),
            private=True,
            aggregators=("mean", "median", "trimmed-mean", "clip-mean"),
            check=_check_pro if _pro else None,
        )
    )
