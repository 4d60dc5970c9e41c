"""Updates and broadcasts as typed values, and their wire format.

Four kinds of client update:
- `LoraDelta`: theta_local - theta_global for each adapter tensor (FedIT, first-order).
- `ZOTrace`: a list of (seed index, scalar) pairs from a seed pool, plus the lr of each
  step (FedKSeed); a few bytes per local step, whatever the model size.
- `SeedTrace`: (seed, coefficient) per ZO direction, which the server replays into a
  delta (ZO devices in FedIT/FwdLLM hybrid fleets); 16 bytes a direction.
- `Projection`: the K coefficients of a client's update on the round's seeded block
  directions (FedProj); 4 bytes a coefficient, whatever the adapter size.

A device also keeps a `ClientState` between rounds (what its algorithm needs to
remember: FedKSeed's caught-up model, FwdLLM's previous broadcast); it never leaves the
device, but it is encoded the same way so a Flower SuperNode can keep it in its context
and the simulator in its checkpoint.

Bytes on the wire are `len(encode(x))` of the real serialized payload, never estimated.
The format is safe to read from untrusted peers: a JSON header plus raw little-endian
arrays (tensors listed by name, dtype and shape in the header); no pickle, no code.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from edgetune.fed.wire import (
    ITEMSIZE,
    MAGIC,
    MAX_EXAMPLES,
    MAX_POOL,
    MAX_ROUNDS,
    MAX_SCALARS,
    MAX_TRACE,
    PayloadError,
    header_int,
    numel,
    specs,
    split,
)


class Update:
    """What every client upload carries beside its values: the examples it trained on
    (the weight of a weighted mean, capped by the server) and what it reports (`meta`:
    its loss, its validation losses). LoraDelta, ZOTrace, SeedTrace and Projection are
    Updates."""

    num_examples: int
    meta: dict[str, float]


@dataclass
class LoraDelta(Update):
    """Adapter tensors (a delta from the client, or the global state from the server)."""

    tensors: dict[str, torch.Tensor]
    num_examples: int = 0
    meta: dict[str, float] = field(default_factory=dict)


@dataclass
class ZOTrace(Update):
    """Local ZO training as (seed index, scalar, lr) per step, over a shared seed pool."""

    indices: list[int]
    scalars: list[float]
    lrs: list[float]
    num_examples: int = 0
    meta: dict[str, float] = field(default_factory=dict)


@dataclass
class SeedTrace(Update):
    """Local ZO training replayable by anyone: theta_local = theta - sum_j coef_j z(seed_j).

    Each direction of each local step contributes (seed, lr * c / q), kept in float64 so
    the replay is the client's own arithmetic, bit for bit. 16 bytes a direction.
    """

    seeds: list[int]
    coefs: list[float]
    num_examples: int = 0
    meta: dict[str, float] = field(default_factory=dict)


@dataclass
class Projection(Update):
    """A client's update as K float32 coefficients on the block directions of the round
    seeded `seed`, over an adapter of `numel` values (the block layout: K blocks of
    numel // K or numel // K + 1 consecutive values, in adapter order)."""

    seed: int
    coefs: torch.Tensor  # (K,) float32
    numel: int
    num_examples: int = 0
    meta: dict[str, float] = field(default_factory=dict)


@dataclass
class ProjectedRounds:
    """FedProj's broadcast: the rounds a client has not replayed, or a full resync.

    Catch-up: the seed and K float32 coefficients of every round since `first_round`
    (oldest first). Resync (`tensors` not empty): the global adapter tensors of round
    `first_round`, sent when the catch-up would cost more bytes than they do. `seed` is
    the round's own projection seed, on which the client projects its update.
    """

    seed: int
    first_round: int
    numel: int
    k: int
    seeds: list[int] = field(default_factory=list)
    coefs: list[torch.Tensor] = field(default_factory=list)  # each (K,) float32
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SeedScalars:
    """FedKSeed's broadcast: for each round since the client last synced (oldest first,
    starting at `first_round`), the accumulated scalar of every seed in the pool.

    On the wire only the non-zero scalars travel, as (u32 index, f64 value) pairs.
    """

    rounds: list[list[float]]
    first_round: int = 0
    pool_size: int = 0
    keys: list[int] = field(default_factory=list)  # a secret pool's round keys (see FedKSeed)


@dataclass
class ClientState:
    """What a device keeps between rounds: named tensors and a few numbers."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)


Payload = LoraDelta | ZOTrace | SeedTrace | Projection | ProjectedRounds | SeedScalars | ClientState
MAX_NUMEL_ADAPTER = 1 << 40  # an adapter's values (a Projection's layout), at most


def encode(payload: Payload) -> bytes:
    """Serialize a payload (the exact bytes a transport would carry)."""
    if isinstance(payload, LoraDelta | ClientState):
        tensors = [(k, v.detach().contiguous().cpu()) for k, v in payload.tensors.items()]
        blob = b"".join(_raw(v) for _, v in tensors)
        header: dict[str, Any] = {
            "tensors": [[k, _DTYPE_NAMES[v.dtype], list(v.shape)] for k, v in tensors]
        }
        if isinstance(payload, LoraDelta):
            header.update(kind="lora_delta", num_examples=payload.num_examples, meta=payload.meta)
        else:
            header.update(kind="client_state", meta=payload.values)
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
    elif isinstance(payload, Projection | ProjectedRounds):
        header, blob = _projected(payload)
    else:
        counts: list[int] = []
        indices: list[int] = []
        values: list[float] = []
        for scalars in payload.rounds:
            nonzero = [(k, a) for k, a in enumerate(scalars) if a != 0.0]
            counts.append(len(nonzero))
            indices.extend(k for k, _ in nonzero)
            values.extend(a for _, a in nonzero)
        n = len(indices)
        blob = struct.pack(f"<{n}I{n}d", *indices, *values)
        header = {
            "kind": "seed_scalars",
            "pool_size": payload.pool_size or max((len(s) for s in payload.rounds), default=0),
            "first_round": payload.first_round,
            "counts": counts,
            **({"keys": payload.keys} if payload.keys else {}),
        }
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + blob


def decode(data: bytes) -> Payload:
    """Parse bytes from `encode`.

    Raises:
        PayloadError: for any malformed input (and no other exception): bad magic, a
            header that is not a JSON object of the expected fields, sizes that do not
            match the data, unknown dtypes, or a declared size beyond the limits.
    """
    header, blob = split(data)
    kind = header.get("kind")
    if kind == "lora_delta":
        return LoraDelta(_tensors(specs(header), blob), _count(header), _meta(header))
    if kind == "client_state":
        return ClientState(_tensors(specs(header), blob), _meta(header))
    if kind == "seed_scalars":
        return _seed_scalars(header, blob)
    if kind == "projection":
        return _projection(header, blob)
    if kind == "projected_rounds":
        return _projected_rounds(header, blob)
    if kind not in ("zo_trace", "seed_trace"):
        raise PayloadError(f"unknown payload kind {kind!r}")
    n = header_int(header, "n", MAX_TRACE)
    if kind == "zo_trace":
        values = _unpack(f"<{n}I{n}f{n}f", blob, kind)
        return ZOTrace(
            list(values[:n]),
            list(values[n : 2 * n]),
            list(values[2 * n :]),
            _count(header),
            _meta(header),
        )
    values = _unpack(f"<{n}Q{n}d", blob, kind)
    return SeedTrace(list(values[:n]), list(values[n:]), _count(header), _meta(header))


def _count(header: dict[str, Any]) -> int:
    return header_int(header, "num_examples", MAX_EXAMPLES)


def _meta(header: dict[str, Any]) -> dict[str, float]:
    """The optional `meta` object: names to numbers (a client's loss, its LoRA rank)."""
    meta = header.get("meta", {})
    if not isinstance(meta, dict) or len(meta) > 16:
        raise PayloadError("payload header: meta must be an object of at most 16 numbers")
    out = {}
    for key, value in meta.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PayloadError(f"payload header: meta.{str(key)[:20]} is not a number")
        try:
            out[str(key)] = float(value)
        except OverflowError:
            raise PayloadError(f"payload header: meta.{str(key)[:20]} is out of range") from None
    return out


def _unpack(fmt: str, blob: bytes, kind: str) -> tuple[Any, ...]:
    if struct.calcsize(fmt) != len(blob):
        raise PayloadError(
            f"malformed {kind} payload: {len(blob)} data bytes, header implies "
            f"{struct.calcsize(fmt)}"
        )
    return struct.unpack(fmt, blob)


_DTYPES = {
    "F32": torch.float32,
    "F64": torch.float64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "U8": torch.uint8,  # FedSpine's packed masks of kept units
    "I32": torch.int32,
}
assert _DTYPES.keys() == ITEMSIZE.keys()
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's little-endian bytes (x86 and ARM hosts are little-endian)."""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensors(specs: list[tuple[str, str, list[int]]], blob: bytes) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, dtype, shape in specs:
        nbytes = numel(shape) * _DTYPES[dtype].itemsize
        if offset + nbytes > len(blob):
            raise PayloadError(f"malformed lora_delta payload: {name[:60]}: data ends early")
        chunk = bytearray(blob[offset : offset + nbytes])
        flat = torch.frombuffer(chunk, dtype=_DTYPES[dtype]) if chunk else torch.empty(0)
        out[name] = flat.to(_DTYPES[dtype]).reshape(shape)
        offset += nbytes
    if offset != len(blob):
        raise PayloadError(
            f"malformed lora_delta payload: {len(blob) - offset} bytes after the last tensor"
        )
    return out


def _seed_scalars(header: dict[str, Any], blob: bytes) -> SeedScalars:
    size = header_int(header, "pool_size", MAX_POOL)
    counts = header.get("counts")
    if not isinstance(counts, list) or len(counts) * max(size, 1) > MAX_SCALARS:
        raise PayloadError(
            f"payload header: counts must be a list, with rounds x pool_size <= {MAX_SCALARS}"
        )
    counts = [header_int({"count": c}, "count", size) for c in counts]
    n = sum(counts)
    values = _unpack(f"<{n}I{n}d", blob, "seed_scalars")
    indices, scalars = values[:n], values[n:]
    rounds, at = [], 0
    for count in counts:
        dense = [0.0] * size
        for k, a in zip(indices[at : at + count], scalars[at : at + count], strict=True):
            if k >= size:
                raise PayloadError(f"seed index {k} outside the pool of {size}")
            dense[k] = a
        rounds.append(dense)
        at += count
    keys = header.get("keys", [])
    if not isinstance(keys, list) or (keys and len(keys) != len(rounds) + 1):
        raise PayloadError(
            "payload header: keys must be a list of one round key per round sent plus the "
            f"round to train, {len(rounds) + 1}, got {keys!r:.80}"
        )
    keys = [header_int({"key": k}, "key", 2**63 - 1) for k in keys]
    return SeedScalars(rounds, header_int(header, "first_round", MAX_ROUNDS), size, keys)


def _projected(payload: Projection | ProjectedRounds) -> tuple[dict[str, Any], bytes]:
    """Header and data of a FedProj upload (K float32) or broadcast (tensors of a
    resync, then a u64 seed per round, then each round's K float32)."""
    if isinstance(payload, Projection):
        coefs = payload.coefs.detach().to(torch.float32).contiguous()
        header: dict[str, Any] = {
            "kind": "projection",
            "seed": payload.seed,
            "k": coefs.numel(),
            "numel": payload.numel,
            "num_examples": payload.num_examples,
            "meta": payload.meta,
        }
        return header, _raw(coefs)
    tensors = [(k, v.detach().contiguous().cpu()) for k, v in payload.tensors.items()]
    rounds = len(payload.seeds)
    header = {
        "kind": "projected_rounds",
        "seed": payload.seed,
        "first_round": payload.first_round,
        "numel": payload.numel,
        "k": payload.k,
        "rounds": rounds,
        "tensors": [[k, _DTYPE_NAMES[v.dtype], list(v.shape)] for k, v in tensors],
    }
    blob = b"".join(_raw(v) for _, v in tensors) + struct.pack(f"<{rounds}Q", *payload.seeds)
    blob += b"".join(_raw(c.detach().to(torch.float32).contiguous()) for c in payload.coefs)
    return header, blob


def _floats(blob: bytes, count: int, kind: str) -> torch.Tensor:
    if len(blob) != 4 * count:
        raise PayloadError(
            f"malformed {kind} payload: {len(blob)} coefficient bytes, header implies {4 * count}"
        )
    return torch.frombuffer(bytearray(blob), dtype=torch.float32) if blob else torch.empty(0)


def _projection(header: dict[str, Any], blob: bytes) -> Projection:
    k = header_int(header, "k", MAX_TRACE)
    return Projection(
        header_int(header, "seed", (1 << 64) - 1),
        _floats(blob, k, "projection"),
        header_int(header, "numel", MAX_NUMEL_ADAPTER),
        _count(header),
        _meta(header),
    )


def _projected_rounds(header: dict[str, Any], blob: bytes) -> ProjectedRounds:
    k = header_int(header, "k", MAX_TRACE)
    rounds = header_int(header, "rounds", MAX_ROUNDS)
    if rounds * max(k, 1) > MAX_SCALARS:
        raise PayloadError(f"payload header: rounds x k must be at most {MAX_SCALARS}")
    layout = specs(header)
    size = sum(numel(shape) * _DTYPES[dtype].itemsize for _, dtype, shape in layout)
    if size + 8 * rounds > len(blob):
        raise PayloadError("malformed projected_rounds payload: data ends early")
    seeds = list(struct.unpack(f"<{rounds}Q", blob[size : size + 8 * rounds]))
    flat = _floats(blob[size + 8 * rounds :], rounds * k, "projected_rounds")
    return ProjectedRounds(
        header_int(header, "seed", (1 << 64) - 1),
        header_int(header, "first_round", MAX_ROUNDS),
        header_int(header, "numel", MAX_NUMEL_ADAPTER),
        k,
        seeds,
        [flat[i * k : (i + 1) * k] for i in range(rounds)],
        _tensors(layout, blob[:size]),
    )
