"""Malicious clients, a simulator option: `fed.attack=KIND:FRACTION` (e.g. signflip:0.2).

Robustness is measured, not assumed: a seeded subset of round(FRACTION x clients)
clients (the same every round, as a compromised device stays compromised) trains
honestly, then corrupts its update before `encode`, so the attack goes through the real
wire format, validation and aggregation. clients.jsonl marks them (`attack`).

Kinds (u is the honest update: a LoRA delta's tensors, a FedKSeed trace's scalars, a
ZO client's seed coefficients, or a FedProj client's block coefficients):

    signflip    -u (gradient ascent: undoes honest progress)
    scale       SCALE x u (a boosted update, "model replacement")
    noise       Gaussian noise with NOISE x the rms of u per value, in place of u
    nan         u with one NaN value
    lie-count   -u claiming num_examples = 10^9 (buys the whole weight of a weighted mean)
    big-scalar  FedKSeed only: every scalar at 0.999 x fed.max_abs_scalar, against the sign
                of the honest one (the largest ascent the validation lets through)
    inflate     INFLATE x u: boosted, but small enough to look like an honest outlier
    alie        "a little is enough" (Baruah et al., NeurIPS 2019): the honest updates' mean
                minus one honest standard deviation, per coordinate (per scalar for a
                FedKSeed trace), so it hides inside the honest spread
    ipm         inner-product manipulation (Xie et al., UAI 2020): -IPM x the honest mean,
                a small update whose inner product with the true one is negative

alie and ipm are omniscient: they see this round's honest updates (the simulator trains
every client first). They apply to LoRA deltas, FedKSeed traces and FedProj projections
(a round's clients project on the same directions); ZO seed coefficients of different
clients lie on different directions, so no per-coordinate statistic exists for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from edgetune.errors import ConfigError
from edgetune.fed.payloads import LoraDelta, Payload, Projection, SeedTrace, ZOTrace
from edgetune.zo.seeds import Stream, generator, stream_seed

SCALE, NOISE, LIE, INFLATE, IPM = 100.0, 10.0, 10**9, 5.0, 0.5
ANY = (LoraDelta, ZOTrace, SeedTrace, Projection)
# kind -> the update kinds it corrupts (it applies to the algorithms whose clients upload one)
TARGETS: dict[str, tuple[type, ...]] = {
    "signflip": ANY,
    "scale": ANY,
    "noise": ANY,
    "nan": ANY,
    "lie-count": ANY,
    "big-scalar": (ZOTrace,),
    "inflate": ANY,
    "alie": (LoraDelta, ZOTrace, Projection),
    "ipm": (LoraDelta, ZOTrace, Projection),
}


@dataclass(frozen=True)
class Attack:
    """Which attack, and the fraction of clients that run it."""

    kind: str
    fraction: float


def parse_attack(spec: str) -> Attack | None:
    """`KIND:FRACTION` as an Attack ('' = none).

    Raises:
        ConfigError: unknown kind, or a fraction outside (0, 1).
    """
    if not spec:
        return None
    kind, _, fraction = spec.partition(":")
    if kind not in TARGETS:
        raise ConfigError(
            f"fed.attack: unknown attack {kind!r}; use one of {', '.join(TARGETS)} "
            "as KIND:FRACTION, e.g. signflip:0.2"
        )
    try:
        share = float(fraction)
    except ValueError:
        share = math.nan
    if not 0.0 < share < 1.0:
        raise ConfigError(
            f"fed.attack: expected KIND:FRACTION with a fraction in (0, 1), got {spec!r} "
            "(e.g. signflip:0.2)"
        )
    return Attack(kind, share)


def applies(kind: str, uploads: tuple[type, ...]) -> bool:
    """Whether attack `kind` corrupts any of the update kinds an algorithm uploads."""
    return any(u in TARGETS[kind] for u in uploads)


def check_applies(
    attack: Attack, algorithm: str, uploads: tuple[type, ...], senders: list[str]
) -> None:
    """Refuse an attack on an algorithm whose clients never send what it corrupts.

    Args:
        senders: the algorithms whose clients do (for the message).

    Raises:
        ConfigError: names the attack, what it corrupts, who sends that, and the fix.
    """
    if applies(attack.kind, uploads):
        return
    corrupts = " or ".join(kind.__name__ for kind in TARGETS[attack.kind])
    raise ConfigError(
        f"fed.attack={attack.kind} corrupts a {corrupts} (seed-pool scalars just under "
        f"fed.max_abs_scalar), which only {' and '.join(senders)} upload; {algorithm} "
        "clients send tensors or seed coefficients: use scale"
    )


def attackers(attack: Attack | None, clients: int, seed: int) -> set[int]:
    """The malicious clients: a seeded draw of round(fraction x clients) (at least 1)."""
    if attack is None:
        return set()
    count = max(1, round(attack.fraction * clients))
    perm = torch.randperm(clients, generator=generator(stream_seed(seed, Stream.ATTACK)))
    return set(perm[:count].tolist())


def corrupt(
    update: Payload,
    attack: Attack,
    seed: int,
    rnd: int,
    client: int,
    max_abs_scalar: float,
    honest: list[Payload] | None = None,
) -> Payload:
    """The malicious version of the honest `update` (a new object; `update` is kept);
    `honest`: this round's honest updates, which alie and ipm are computed from."""
    gen = generator(stream_seed(seed, Stream.ATTACK, rnd, client))
    kind = attack.kind
    if kind in ("alie", "ipm"):
        return _omniscient(update, kind, [h for h in honest or [] if type(h) is type(update)])
    if isinstance(update, LoraDelta):
        tensors = {n: _values(t, kind, gen) for n, t in update.tensors.items()}
        if kind == "nan":
            first = next(iter(tensors))
            tensors[first] = tensors[first].clone().reshape(-1)
            tensors[first][0] = math.nan
            tensors[first] = tensors[first].reshape(update.tensors[first].shape)
        return LoraDelta(tensors, _count(update.num_examples, kind), dict(update.meta))
    if isinstance(update, ZOTrace):
        scalars = _scalars(update.scalars, kind, gen, max_abs_scalar)
        count = _count(update.num_examples, kind)
        return ZOTrace(list(update.indices), scalars, list(update.lrs), count, dict(update.meta))
    if isinstance(update, SeedTrace):
        coefs = _scalars(update.coefs, kind, gen, max_abs_scalar)
        count = _count(update.num_examples, kind)
        return SeedTrace(list(update.seeds), coefs, count, dict(update.meta))
    if isinstance(update, Projection):
        values = _scalars(update.coefs.tolist(), kind, gen, max_abs_scalar)
        count = _count(update.num_examples, kind)
        corrupted = torch.tensor(values, dtype=torch.float32)
        return Projection(update.seed, corrupted, update.numel, count, dict(update.meta))
    raise TypeError(f"clients do not send {type(update).__name__}")


def _omniscient(update: Payload, kind: str, honest: list[Any]) -> Payload:
    """alie / ipm from the honest updates of the round (the update itself if none)."""
    if isinstance(update, LoraDelta):
        names = [n for n in update.tensors if all(n in h.tensors for h in honest)]
        if not honest or len(names) != len(update.tensors):
            return update
        tensors = {}
        for n in names:
            stacked = torch.stack([h.tensors[n].double() for h in honest])
            mean = stacked.mean(0)
            std = stacked.std(0, correction=0)
            tensors[n] = (mean - std if kind == "alie" else -IPM * mean).to(update.tensors[n].dtype)
        return LoraDelta(tensors, update.num_examples, dict(update.meta))
    if isinstance(update, Projection):  # one round's clients share the directions
        if not honest:
            return update
        stacked = torch.stack([h.coefs.double() for h in honest])
        mean, std = stacked.mean(0), stacked.std(0, correction=0)
        coefs = (mean - std if kind == "alie" else -IPM * mean).to(torch.float32)
        return Projection(update.seed, coefs, update.numel, update.num_examples, dict(update.meta))
    assert isinstance(update, ZOTrace)
    pool = [c for h in honest for c in h.scalars]
    if not pool:
        return update
    centre = sum(pool) / len(pool)
    spread = math.sqrt(sum((c - centre) ** 2 for c in pool) / len(pool))
    value = centre - spread if kind == "alie" else -IPM * centre
    scalars = [value] * len(update.scalars)
    return ZOTrace(
        list(update.indices), scalars, list(update.lrs), update.num_examples, dict(update.meta)
    )


def _count(num_examples: int, kind: str) -> int:
    return LIE if kind == "lie-count" else num_examples


def _values(t: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind in ("signflip", "lie-count"):
        return -t
    if kind == "scale":
        return t * SCALE
    if kind == "inflate":
        return t * INFLATE
    if kind == "noise":
        rms = float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0
        return (torch.randn(t.shape, generator=gen) * NOISE * rms).to(t.dtype)
    return t.clone()


def _scalars(
    values: list[float], kind: str, gen: torch.Generator, max_abs_scalar: float
) -> list[float]:
    if kind == "big-scalar":
        return [-math.copysign(0.999 * max_abs_scalar, v) for v in values]
    out = _values(torch.tensor(values, dtype=torch.float64), kind, gen).tolist()
    if kind == "nan" and out:
        out[0] = math.nan
    return out
