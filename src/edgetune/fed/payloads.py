"""Updates and broadcasts as typed values, and their wire format.

Three kinds of client update:
- `LoraDelta`: theta_local - theta_global for each adapter tensor (FedIT, first-order).
- `ZOTrace`: a list of (seed index, scalar) pairs from a seed pool, plus the lr of each
  step (FedKSeed); a few bytes per local step, whatever the model size.
- `SeedTrace`: (seed, coefficient) per ZO direction, which the server replays into a
  delta (ZO devices in FedIT/FwdLLM hybrid fleets); 16 bytes a direction.

Bytes on the wire are `len(encode(x))` of the real serialized payload, never estimated.
The format is safe to read from untrusted peers: a JSON header plus raw little-endian
arrays (safetensors for tensors); no pickle, no code.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import torch

from edgetune.errors import EdgetuneError

_MAGIC = b"ET1"


@dataclass
class LoraDelta:
    """Adapter tensors (a delta from the client, or the global state from the server)."""

    tensors: dict[str, torch.Tensor]
    num_examples: int = 0
    meta: dict[str, float] = field(default_factory=dict)


@dataclass
class ZOTrace:
    """Local ZO training as (seed index, scalar, lr) per step, over a shared seed pool."""

    indices: list[int]
    scalars: list[float]
    lrs: list[float]
    num_examples: int = 0
    meta: dict[str, float] = field(default_factory=dict)


@dataclass
class SeedTrace:
    """Local ZO training replayable by anyone: theta_local = theta - sum_j coef_j z(seed_j).

    Each direction of each local step contributes (seed, lr * c / q), kept in float64 so
    the replay is the client's own arithmetic, bit for bit. 16 bytes a direction.
    """

    seeds: list[int]
    coefs: list[float]
    num_examples: int = 0
    meta: dict[str, float] = field(default_factory=dict)


@dataclass
class SeedScalars:
    """FedKSeed's broadcast: the accumulated scalar of every seed in the pool this round."""

    scalars: list[float]


Payload = LoraDelta | ZOTrace | SeedTrace | SeedScalars


def encode(payload: Payload) -> bytes:
    """Serialize a payload (the exact bytes a transport would carry)."""
    if isinstance(payload, LoraDelta):
        from safetensors.torch import save

        blob = save({k: v.contiguous() for k, v in payload.tensors.items()})
        header = {"kind": "lora_delta", "num_examples": payload.num_examples, "meta": payload.meta}
    elif isinstance(payload, ZOTrace):
        n = len(payload.indices)
        blob = struct.pack(f"<{n}I{n}f{n}f", *payload.indices, *payload.scalars, *payload.lrs)
        header = {
            "kind": "zo_trace",
            "n": n,
            "num_examples": payload.num_examples,
            "meta": payload.meta,
        }
    elif isinstance(payload, SeedTrace):
        n = len(payload.seeds)
        blob = struct.pack(f"<{n}Q{n}d", *payload.seeds, *payload.coefs)
        header = {
            "kind": "seed_trace",
            "n": n,
            "num_examples": payload.num_examples,
            "meta": payload.meta,
        }
    else:
        blob = struct.pack(f"<{len(payload.scalars)}d", *payload.scalars)
        header = {"kind": "seed_scalars", "n": len(payload.scalars)}
    head = json.dumps(header, separators=(",", ":")).encode()
    return _MAGIC + struct.pack("<I", len(head)) + head + blob


def decode(data: bytes) -> Payload:
    """Parse bytes from `encode`; raises EdgetuneError on anything malformed."""
    if data[:3] != _MAGIC or len(data) < 7:
        raise EdgetuneError("payload is not an edgetune update (bad magic)")
    (size,) = struct.unpack("<I", data[3:7])
    try:
        header = json.loads(data[7 : 7 + size])
    except ValueError as exc:
        raise EdgetuneError(f"payload header is not JSON: {exc}") from None
    blob = data[7 + size :]
    kind = header.get("kind")
    try:
        if kind == "lora_delta":
            from safetensors.torch import load

            return LoraDelta(load(blob), int(header["num_examples"]), header.get("meta", {}))
        n = int(header["n"])
        if kind == "zo_trace":
            values = struct.unpack(f"<{n}I{n}f{n}f", blob)
            return ZOTrace(
                list(values[:n]),
                list(values[n : 2 * n]),
                list(values[2 * n :]),
                int(header["num_examples"]),
                header.get("meta", {}),
            )
        if kind == "seed_trace":
            values = struct.unpack(f"<{n}Q{n}d", blob)
            return SeedTrace(
                list(values[:n]),
                list(values[n:]),
                int(header["num_examples"]),
                header.get("meta", {}),
            )
        if kind == "seed_scalars":
            return SeedScalars(list(struct.unpack(f"<{n}d", blob)))
    except (struct.error, KeyError, ValueError, RuntimeError) as exc:
        raise EdgetuneError(f"malformed {kind} payload: {exc}") from None
    raise EdgetuneError(f"unknown payload kind {kind!r}")
