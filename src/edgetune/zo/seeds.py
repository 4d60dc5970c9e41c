"""Seeds are state: every random direction comes from an explicit generator whose seed is
derived from named integers (run seed, step, query, and later round and client).

The derivation hashes the parts with SHA-256, so it is stable across processes, Python
versions and machines (Python's `hash()` is salted per process), and nearby inputs give
unrelated seeds.
"""

from __future__ import annotations

import hashlib
import struct

import torch


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
