"""FedKSeed / FedKSeed-Pro: federated ZO with a finite pool of K shared seeds.

Qin et al., "Federated Full-Parameter Tuning of Billion-Sized Language Models with
Communication Cost under 18 Kilobytes" (2024). Every party knows the pool
s_0..s_{K-1} = derive(run seed, POOL, k). A client's local step picks an index k, takes
the two-point estimate c along z(s_k) and updates theta -= lr * c * z(s_k); it uploads only
the (k, c, lr) triples (`ZOTrace`, 12 bytes a step). The server accumulates per seed

    a_k = sum_c (n_c / N) * sum_{t of client c with index k} lr_t * c_t

and the new global model is theta' = theta - sum_k a_k z(s_k). It broadcasts the K-vector
a (`SeedScalars`); a client holding theta replays it to get theta' exactly, because the
replay is the same arithmetic in the same order on every party.

Pro samples k with probability proportional to the accumulated |a_k| seen so far (plus a
floor, so every seed stays possible): seeds that moved the model more are tried more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from edgetune.fed.algorithms.base import (
    AggregateResult,
    load_trainable,
    screen,
    trainable_state,
)
from edgetune.fed.local import ClientJob
from edgetune.fed.payloads import SeedScalars, ZOTrace
from edgetune.fed.validate import check_trace
from edgetune.peft import Adapter
from edgetune.zo.directions import add_direction, loss_at, restore, snapshot
from edgetune.zo.estimate import LossFn, ZOEstimate
from edgetune.zo.seeds import derive_seed, generator

_POOL_STREAM = 2  # distinguishes pool seeds from step and data-order seeds


def seed_pool(run_seed: int, size: int) -> list[int]:
    """The K candidate seeds every party derives from the run seed."""
    return [derive_seed(run_seed, _POOL_STREAM, k) for k in range(size)]


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


class FedKSeed:
    """Seed-pool federated ZO (see the module docstring)."""

    def __init__(self, cfg: Any, adapter: Adapter, seed: int):
        self.cfg = cfg
        self.name = cfg.algorithm
        self.pool = seed_pool(seed, cfg.pool_size)
        self.state = trainable_state(adapter)
        self.previous = {k: v.clone() for k, v in self.state.items()}
        self.last = [0.0] * cfg.pool_size
        self.magnitude = torch.zeros(cfg.pool_size, dtype=torch.float64)

    def configure(self, rnd: int, rank: int | None = None) -> SeedScalars:
        """Broadcast last round's accumulated scalars (K floats)."""
        return SeedScalars(list(self.last))

    def probabilities(self) -> torch.Tensor | None:
        """Pro: sampling probabilities from past |a_k| (None = uniform)."""
        if self.name != "fedkseed-pro" or not self.magnitude.any():
            return None
        weights = self.magnitude + self.magnitude[self.magnitude > 0].mean() * 0.1
        return (weights / weights.sum()).float()

    def client_update(self, adapter: Adapter, payload: Any, job: ClientJob) -> ZOTrace:
        """Catch up by replaying the broadcast, train with pool seeds, upload the trace."""
        load_trainable(adapter, self.previous)  # what every client held after last round
        replay(adapter.trainable(), self.pool, payload.scalars)
        estimator = PoolEstimator(self.pool, job.eps, self.probabilities())
        results = job.run(adapter, estimator)
        return ZOTrace(
            indices=[int(r.estimate.extras["index"]) for r in results if r.estimate],
            scalars=[r.estimate.scalars[0] for r in results if r.estimate],
            lrs=[job.lr] * len(results),
            num_examples=len(job.rows),
            meta={"loss": sum(r.loss for r in results) / max(len(results), 1)},
        )

    def aggregate(self, rnd: int, updates: list[tuple[int, Any]]) -> AggregateResult:
        """Validate traces, accumulate a_k, move the global model by replay."""
        good, result = screen(updates, self._check)
        acc = [0.0] * len(self.pool)
        total = sum(t.num_examples for t in good)
        for trace in good:
            weight = trace.num_examples / total
            for k, c, lr in zip(trace.indices, trace.scalars, trace.lrs, strict=True):
                if self.cfg.aggregator == "clip-mean":
                    c = max(-self.cfg.clip, min(self.cfg.clip, c))
                acc[k] += weight * lr * c
        self.previous = {k: v.clone() for k, v in self.state.items()}
        params = list(self.state.values())
        replay(params, self.pool, acc)
        self.last = acc
        self.magnitude += torch.tensor([abs(a) for a in acc], dtype=torch.float64)
        result.stats["seeds_used"] = float(sum(1 for a in acc if a != 0.0))
        return result

    def _check(self, update: Any) -> str | None:
        if not isinstance(update, ZOTrace):
            return "not a ZO trace"
        return check_trace(update, len(self.pool), self.cfg.max_abs_scalar)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Global and previous tensors, the last broadcast and the Pro magnitudes."""
        out = {f"state.{k}": v for k, v in self.state.items()}
        out.update({f"previous.{k}": v for k, v in self.previous.items()})
        out["last"] = torch.tensor(self.last, dtype=torch.float64)
        out["magnitude"] = self.magnitude
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from `state_dict`."""
        # Keep the adapter's tensor order: directions are drawn tensor by tensor in it,
        # and a checkpoint file stores its keys sorted.
        self.state = {k: state[f"state.{k}"].clone() for k in self.state}
        self.previous = {k: state[f"previous.{k}"].clone() for k in self.state}
        self.last = state["last"].tolist()
        self.magnitude = state["magnitude"].clone()
