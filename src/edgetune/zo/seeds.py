"""Seeds are state: every random direction comes from an explicit generator whose seed is
derived from named integers (run seed, step, query, and later round and client).

The derivation hashes the parts with SHA-256, so it is stable across processes, Python
versions and machines (Python's `hash()` is salted per process), and nearby inputs give
unrelated seeds.
"""

from __future__ import annotations

import hashlib
import struct
from enum import IntEnum

import torch


class Stream(IntEnum):
    """Every seed stream derived from a run seed, named in one place.

    A run-level derivation is `stream_seed(run_seed, Stream.X, *parts)`: the stream tag
    sits right after the run seed, so two streams never share an input, whatever their
    other parts (a round number can never pass for a pool index). Steps are not a stream:
    a stepper derives `derive_seed(job_seed, step)` from its own (job or run) seed.
    """

    DATA = 1  # data order: (epoch)
    POOL = 2  # FedKSeed's candidate seeds: (k)
    SELECT = 3  # clients selected in a round: (round)
    FATE = 4  # a simulated client's availability and dropout: (round, client)
    ATTACK = 5  # which clients attack, and their noise: () and (round, client)
    JOB = 6  # a client's local round (batches and step seeds): (round, client)
    ARM = 7  # FedSpine's random arms: (round, client)
    DP = 8  # differential privacy noise: (server secret, round)
    POOL_KEY = 9  # a secret seed pool's round key: (federation secret, round)
    DP_DEVICE = 10  # local differential privacy noise: (device secret, round)
    PROJECT = 11  # FedProj's block directions of a round: (round)
    INIT = 0x1A17  # on-device LoRA initialisation: ()


def stream_seed(seed: int, stream: Stream, *parts: int) -> int:
    """The seed of `parts` in `stream` of the run seeded `seed`."""
    return derive_seed(seed, int(stream), *parts)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the integer `parts`.

    Args:
        *parts: e.g. (run_seed, step, query). Negative values are allowed.

    Returns:
        An int in [0, 2**63).
    """
    packed = b"".join(struct.pack("<q", int(p)) for p in parts)
    return int.from_bytes(hashlib.sha256(packed).digest()[:8], "little") >> 1


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed` (never the global RNG)."""
    return torch.Generator(device="cpu").manual_seed(seed)
