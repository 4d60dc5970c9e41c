"""FedProj: first-order local training, sent as coefficients on shared seeded directions.

After Ferret (Shu et al., "Ferret: Federated Full-Parameter Tuning at Scale for Large
Language Models", ICML 2025, arXiv 2409.06277): a client that can backpropagate trains
its adapter locally, then sends only the coefficients of its update on K random
directions that every party generates from the round's seed; the server and every other
client rebuild the update from the seed. First-order accuracy at seed-sized bytes, with
FedKSeed's catch-up for devices that missed rounds.

Directions (block-wise, cheap enough for a device). Flatten the adapter's trainable
tensors, in adapter order, into one vector of D values and cut it into K consecutive
blocks (the first D mod K blocks hold D // K + 1 values, the others D // K). Round t's
seed s_t = derive(run seed, PROJECT, t) seeds one generator that draws D random signs
r in {-1, +1}^D; block b's direction r_b is r on block b and 0 elsewhere. The K
directions are orthogonal, ||r_b||^2 = n_b (the block's size), and drawing them costs D
random signs, not K x D Gaussians (a dense basis over a 2.4M-value adapter at K = 4K
would be 10^10 numbers a round).

Client c, holding the global adapter theta, trains locally to theta_c and projects its
update delta_c = theta_c - theta block by block:

    c_{c,b} = <delta_{c,b}, r_b> / n_b          (K float32 coefficients, 4 bytes each)

which is the least-squares fit of delta_c on the directions: exact for an update inside
their span (delta = sum_b alpha_b r_b gives c_b = alpha_b). P delta_c = sum_b c_{c,b} r_b
is the orthogonal projection of delta_c on the span, never against the update
(<P delta, delta> = ||P delta||^2 >= 0) and never longer than it, but it keeps only about
K / D of it: over the random signs E[r_b r_b^T] = I on block b, so E[P delta] = delta / n_b
on each block. The server therefore steps along the unbiased estimate (Ferret's
random-basis reconstruction, block by block):

    delta_hat = sum_b n_b c_b r_b,      E[delta_hat] = delta

at a variance about n_b times ||delta||^2 per block, in directions that change every
round. No rebuild from K < D numbers is both exact on the span and unbiased (an exact
rank-K rebuild has trace K, an unbiased one trace D): the coefficients are the exact fit,
the step is the unbiased one, and `fed.server_lr` scales it (server_lr = 1 / n_b on equal
blocks steps along the projection itself). Measured on SmolLM2-135M / BBC News (10
clients, 3 of them a round, 3 local steps, K = 3840, n_b = 636, one seed): after 5 rounds
the projection (server_lr = 1 / 636) left held-out accuracy at its zero-shot 0.58; the
unbiased step gave 0.81, 0.91, 0.81, 0.91, 0.90 round by round (K = 1024: 0.79, 0.87,
0.85, 0.87, 0.75), FedIT 0.83, 0.90, 0.83, 0.90, 0.89.

The server validates each upload (the round's seed, K coefficients over D values, all
finite, a positive example count, and the norm of its fit,
||P delta_c|| = sqrt(sum_b n_b c_{c,b}^2) <= fed.max_update_norm: never more than the
update's own norm, so the bound means what it means for FedIT), combines the coefficient
vectors under `fed.aggregator` (the weighted mean, or coordinate-wise median / trimmed
mean: every client of a round projects on the same directions, so coordinate b of every
vector measures the same thing; clip-mean scales each vector to a fit norm of at most
fed.clip), and moves the global adapter by

    a_{t,b} = server_lr * n_b * combine_c(c_c)_b  (float32);   theta <- theta + sum_b a_{t,b} r_b

It keeps (s_t, a_t) of every round. A selected client gets the rounds since it last
synced and replays them onto the adapter it holds (its `ClientState`): the same float32
additions in the same order as the server's, so it holds the global adapter bit for bit.
When those rounds would cost more bytes on the wire than the adapter itself (about
K x 4 + 8 bytes a round against D x 4 and its tensor list), the server sends the adapter
instead (a resync), so no catch-up costs more than a FedIT broadcast. A device that holds
nothing starts from the initial adapter; one that restarted (`forget`) is resent every
round, or resynced.

Central differential privacy (fed.dp, dp.where=server). A client's release is its fitted
update, whose norm is ||v_c|| with v_{c,b} = sqrt(n_b) c_{c,b}: the server clips each v_c
to dp.clip, sums, adds N(0, sigma^2 clip^2) to each of the K coordinates from its secret
(`fed/privacy.py`), divides by the clients a round selects, and steps along
a_{t,b} = server_lr x sqrt(n_b) x that mean (the unbiased step of the mean's
coefficients: n_b x v_b / sqrt(n_b)). The step is post-processing of the noised mean, so
the accountant's guarantee holds as for FedIT; the noise is K numbers a round, not D (the
norm of the noise is sigma clip sqrt(K), against sigma clip sqrt(D) for a dense delta).
Only the mean is private (fed.aggregator other than mean is refused), and noising on the
device (dp.where=device) is not built for FedProj.

Devices that cannot backpropagate (a planned zo or prge method) train with their ZO
estimator and project their update the same way, so a mixed fleet is seed-sized both
ways. Sending FedKSeed-style seed traces instead (and broadcasting them) is not built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from edgetune.errors import ConfigError, EdgetuneError
from edgetune.fed.aggregate import check_bound, clip_scale, combine
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
from edgetune.fed.payloads import ClientState, ProjectedRounds, Projection, encode
from edgetune.fed.wire import MAX_TRACE
from edgetune.peft import Adapter
from edgetune.zo.seeds import Stream, generator, stream_seed


@dataclass(frozen=True)
class BlockLayout:
    """K consecutive blocks over a flat vector of `numel` values (see the module
    docstring): the first numel % k blocks hold numel // k + 1 values."""

    numel: int
    k: int

    def __post_init__(self) -> None:
        most = min(self.numel, MAX_TRACE)
        if not 0 < self.k <= most:
            raise ConfigError(
                f"fed.proj_k={self.k}: the adapter has {self.numel} trainable values and a "
                f"payload carries at most {MAX_TRACE} coefficients, so use 1 <= fed.proj_k "
                f"<= {most} (one block of values per coefficient)"
            )

    @property
    def split(self) -> int:
        """Where the blocks of numel // k + 1 values end."""
        return (self.numel % self.k) * (self.numel // self.k + 1)

    def sizes(self) -> torch.Tensor:
        """n_b of every block (int64)."""
        small, big = divmod(self.numel, self.k)
        return torch.tensor([small + 1] * big + [small] * (self.k - big), dtype=torch.int64)

    def signs(self, seed: int) -> torch.Tensor:
        """r: the D random signs of the round seeded `seed` (float32)."""
        draw = torch.randint(0, 2, (self.numel,), generator=generator(seed), dtype=torch.float32)
        return draw.mul_(2.0).sub_(1.0)

    def project(self, flat: torch.Tensor, seed: int) -> torch.Tensor:
        """c_b = <x_b, r_b> / n_b for a flat vector x (summed in float64; K float32)."""
        prod = flat.double() * self.signs(seed).double()
        big = self.numel % self.k
        head, tail = prod[: self.split], prod[self.split :]
        parts = [head.view(big, -1).sum(1)] if big else []
        sums = torch.cat([*parts, tail.view(self.k - big, -1).sum(1)])
        return (sums / self.sizes()).to(torch.float32)

    def rebuild(self, coefs: torch.Tensor, seed: int) -> torch.Tensor:
        """sum_b a_b r_b as a flat float32 vector of D values."""
        spread = coefs.to(torch.float32).repeat_interleave(self.sizes(), output_size=self.numel)
        return self.signs(seed).mul_(spread)


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors' values, in order, as one flat vector."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@torch.no_grad()
def replay(params: Sequence[torch.Tensor], layout: BlockLayout, seed: int, coefs: Any) -> None:
    """theta <- theta + sum_b a_b r_b over the tensors `params` (in adapter order)."""
    step = layout.rebuild(torch.as_tensor(coefs), seed)
    offset = 0
    for p in params:
        p.add_(step[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def rebuilt_norm(coefs: torch.Tensor, layout: BlockLayout) -> float:
    """||sum_b c_b r_b|| = sqrt(sum_b n_b c_b^2), from the coefficients alone."""
    return math.sqrt(float((coefs.double().pow(2) * layout.sizes()).sum()))


@dataclass
class HeldAdapter:
    """What a FedProj device holds: the global adapter of round `round`."""

    tensors: dict[str, torch.Tensor]
    round: int

    @staticmethod
    def from_state(state: ClientState | None, initial: dict[str, torch.Tensor]) -> HeldAdapter:
        """The adapter a device's state holds (the initial adapter if none)."""
        if state is None:
            return HeldAdapter({k: v.clone() for k, v in initial.items()}, 0)
        return HeldAdapter(dict(state.tensors), int(state.values["round"]))

    def to_state(self) -> ClientState:
        return ClientState(dict(self.tensors), {"round": float(self.round)})


class FedProj(StandardRoles):
    """First-order clients, coefficients on seeded block directions (see the module
    docstring)."""

    def __init__(self, fed: Any, adapter: Adapter, seed: int, privacy: Any = None):
        """`fed` is the run's `fed` section (proj_k, server_lr, max_update_norm and the
        aggregator's settings); `seed` the run seed (the rounds' direction seeds); with
        `privacy` (fed.dp) each client's fitted update is clipped and the mean noised (see
        the module docstring)."""
        self.cfg = fed
        self.privacy = privacy
        self.run_seed = seed
        self.state = trainable_state(adapter)
        self.initial = {k: v.clone() for k, v in self.state.items()}
        self.layout = BlockLayout(sum(v.numel() for v in self.state.values()), fed.proj_k)
        self.seeds: list[int] = []  # s_t of every aggregated round
        self.history: list[torch.Tensor] = []  # a_t of every aggregated round (K float32)
        self.synced: dict[int, int] = {}  # client -> round of the adapter it holds
        resync = ProjectedRounds(0, 0, self.layout.numel, fed.proj_k, tensors=self.state)
        self.resync_bytes = len(encode(resync))  # the adapter on the wire

    def round_seed(self, rnd: int) -> int:
        """s_t: the seed of round `rnd`'s directions (0-based)."""
        return stream_seed(self.run_seed, Stream.PROJECT, rnd)

    def configure(self, rnd: int, plan: Any) -> ProjectedRounds:
        """The rounds since the plan's client last synced, or the adapter when those
        would cost more bytes (a resync)."""
        since = self.synced.get(plan.client, 0)
        now, seed = len(self.history), self.round_seed(rnd)
        k, numel = self.layout.k, self.layout.numel
        rounds = ProjectedRounds(seed, since, numel, k, self.seeds[since:], self.history[since:])
        if len(encode(rounds)) <= self.resync_bytes:
            return rounds
        tensors = {n: v.clone() for n, v in self.state.items()}
        return ProjectedRounds(seed, now, numel, k, tensors=tensors)

    def forget(self, client: int) -> None:
        """The client restarted and may hold any adapter: send it everything again."""
        self.synced.pop(client, None)

    def catch_up(
        self, adapter: Adapter, payload: ProjectedRounds, held: HeldAdapter
    ) -> HeldAdapter:
        """Load the held adapter (or the resync's) into `adapter` and replay the rounds
        it has not seen; returns what it now holds (the global adapter of the last round).

        Raises:
            EdgetuneError: the broadcast's layout is not this run's, or the held adapter
                is older than its first round.
        """
        if (payload.numel, payload.k) != (self.layout.numel, self.layout.k):
            raise EdgetuneError(
                f"the broadcast projects {payload.numel} values on {payload.k} blocks, this "
                f"client's adapter {self.layout.numel} on fed.proj_k={self.layout.k}"
            )
        if payload.tensors:
            held = HeldAdapter(dict(payload.tensors), payload.first_round)
        skip = rounds_held(held.round, payload.first_round, len(payload.seeds))
        load_trainable(adapter, held.tensors)
        for seed, coefs in zip(payload.seeds[skip:], payload.coefs[skip:], strict=True):
            replay(adapter.trainable(), self.layout, seed, coefs)
        rnd = payload.first_round + len(payload.seeds)
        return HeldAdapter(trainable_state(adapter), rnd)

    def client_update(
        self, adapter: Adapter, payload: Any, job: ClientJob, state: ClientState | None
    ) -> tuple[Projection, ClientState]:
        """Catch up, keep that adapter, train locally, upload the update's coefficients
        on the round's directions."""
        held = self.catch_up(adapter, payload, HeldAdapter.from_state(state, self.initial))
        results = job.run(adapter)
        local = trainable_state(adapter)
        delta = flatten([local[n] - held.tensors[n] for n in held.tensors])
        coefs = self.layout.project(delta, payload.seed)
        loss = sum(r.loss for r in results) / max(len(results), 1)
        update = Projection(payload.seed, coefs, self.layout.numel, len(job.rows), {"loss": loss})
        return update, held.to_state()

    def aggregate(
        self, rnd: int, updates: list[tuple[int, Any]], plans: Mapping[int, Any] | None = None
    ) -> AggregateResult:
        """Validate, combine the coefficient vectors, move the global adapter by replay
        (every plan trains the whole adapter, so `plans` add no check)."""
        seed = self.round_seed(rnd)
        good, result = screen(updates, lambda client, u: self.check(u, seed))
        step = self.combine(good, rnd)
        replay(list(self.state.values()), self.layout, seed, step)
        for client, _ in updates:  # every client that replied has replayed up to `rnd`
            self.synced[client] = rnd
        self.seeds.append(seed)
        self.history.append(step)
        result.stats["step_norm"] = rebuilt_norm(step, self.layout)
        return result

    def combine(self, updates: list[Projection], rnd: int = 0) -> torch.Tensor:
        """a_t = server_lr x n_b x the rule's combination of the coefficient vectors (K
        float32; zeros without updates); under fed.dp, round `rnd`'s private mean."""
        if not updates:
            return torch.zeros(self.layout.k, dtype=torch.float32)
        if self.privacy is not None:
            root = self.layout.sizes().double().sqrt()
            fitted = [{"v": u.coefs.double() * root} for u in updates]
            mean = self.privacy.mean(rnd, fitted)["v"]
            return (mean * root * self.cfg.server_lr).to(torch.float32)
        rule = self.cfg.aggregator
        vectors = [u.coefs.double() for u in updates]
        if rule == "clip-mean":
            check_bound("clip", self.cfg.clip)
            scales = [clip_scale(rebuilt_norm(v, self.layout), self.cfg.clip) for v in vectors]
            vectors = [v * s for v, s in zip(vectors, scales, strict=True)]
        weights = [float(u.num_examples) for u in updates]
        combined = combine(vectors, weights, rule, self.cfg.trim)
        return (combined * self.layout.sizes() * self.cfg.server_lr).to(torch.float32)

    def check(self, update: Any, seed: int) -> str | None:
        """The reason `update` is not a valid projection on the round seeded `seed`, or
        None."""
        check_bound("max_update_norm", self.cfg.max_update_norm)
        if not isinstance(update, Projection):
            return "not a projection (K coefficients on the round's directions)"
        if update.seed != seed:
            return (
                f"projected on the directions of seed {update.seed}, not this round's "
                f"({seed}): a stale or forged update"
            )
        k, numel = self.layout.k, self.layout.numel
        if update.numel != numel:
            return f"layout over {update.numel} values, the adapter has {numel}"
        if update.coefs.shape != (k,) or update.coefs.dtype != torch.float32:
            return f"{update.coefs.numel()} coefficients, expected fed.proj_k={k} float32"
        if not torch.isfinite(update.coefs).all():
            return "non-finite coefficient"
        if not update.num_examples > 0:
            return f"num_examples must be positive, got {update.num_examples}"
        norm = rebuilt_norm(update.coefs, self.layout)
        if not norm <= self.cfg.max_update_norm:
            return f"update norm {norm:.3g} exceeds the bound {self.cfg.max_update_norm:.3g}"
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Global and initial tensors, every round's seed and step, who synced when."""
        out = {f"state.{k}": v for k, v in self.state.items()}
        out.update({f"initial.{k}": v for k, v in self.initial.items()})
        k = self.layout.k
        out["history"] = torch.stack(self.history) if self.history else torch.zeros(0, k)
        out["seeds"] = torch.tensor(self.seeds, dtype=torch.int64)
        out["synced"] = torch.tensor(sorted(self.synced.items()), dtype=torch.int64).reshape(-1, 2)
        if self.privacy is not None:
            out.update(self.privacy.state_dict())
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from `state_dict`."""
        # Keep the adapter's tensor order: the flat layout follows it, and a checkpoint
        # file stores its keys sorted.
        self.state = {k: state[f"state.{k}"].clone() for k in self.state}
        self.initial = {k: state[f"initial.{k}"].clone() for k in self.state}
        self.history = [row.clone() for row in state["history"].to(torch.float32)]
        self.seeds = [int(s) for s in state["seeds"].tolist()]
        self.synced = {int(c): int(r) for c, r in state["synced"].tolist()}
        if self.privacy is not None:
            self.privacy.load_state_dict(state)


def _build(setup: AlgorithmSetup) -> FedProj:
    return FedProj(setup.fed, setup.adapter, setup.seed, setup.privacy)


register(
    AlgorithmSpec(
        name="fedproj",
        build=_build,
        help="first-order clients upload K coefficients of their update on seeded block "
        "directions (Ferret-style); K x 4 bytes up, catch-up rounds down",
        settings=("proj_k", "server_lr", "max_update_norm"),
        uploads=(Projection,),
        aggregators=("mean", "median", "trimmed-mean", "clip-mean"),
        private=True,
    )
)
