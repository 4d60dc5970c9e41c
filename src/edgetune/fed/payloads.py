"""Updates and broadcasts as typed values, and their wire format.

Three kinds of client update:
- `LoraDelta`: theta_local - theta_global for each adapter tensor (FedIT, first-order).
- `ZOTrace`: a list of (seed index, scalar) pairs from a seed pool, plus the lr of each
  step (FedKSeed); a few bytes per local step, whatever the model size.
- `SeedTrace`: (seed, coefficient) per ZO direction, which the server replays into a
  delta (ZO devices in FedIT/FwdLLM hybrid fleets); 16 bytes a direction.

Bytes on the wire are `len(encode(x))` of the real serialized payload, never estimated.
The format is safe to read from untrusted peers: a JSON header plus raw little-endian
arrays (tensors listed by name, dtype and shape in the header); no pickle, no code.
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
    """FedKSeed's broadcast: for each round since the client last synced (oldest first,
    starting at `first_round`), the accumulated scalar of every seed in the pool.

    On the wire only the non-zero scalars travel, as (u32 index, f64 value) pairs.
    """

    rounds: list[list[float]]
    first_round: int = 0
    pool_size: int = 0


Payload = LoraDelta | ZOTrace | SeedTrace | SeedScalars


def encode(payload: Payload) -> bytes:
    """Serialize a payload (the exact bytes a transport would carry)."""
    if isinstance(payload, LoraDelta):
        tensors = [(k, v.detach().contiguous().cpu()) for k, v in payload.tensors.items()]
        blob = b"".join(_raw(v) for _, v in tensors)
        header = {
            "kind": "lora_delta",
            "num_examples": payload.num_examples,
            "meta": payload.meta,
            "tensors": [[k, _DTYPE_NAMES[v.dtype], list(v.shape)] for k, v in tensors],
        }
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
        }
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
            return LoraDelta(
                _tensors(header["tensors"], blob),
                int(header["num_examples"]),
                header.get("meta", {}),
            )
        if kind == "seed_scalars":
            return _seed_scalars(header, blob)
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
    except (struct.error, KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise EdgetuneError(f"malformed {kind} payload: {exc}") from None
    raise EdgetuneError(f"unknown payload kind {kind!r}")


_DTYPES = {
    "F32": torch.float32,
    "F64": torch.float64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's little-endian bytes (x86 and ARM hosts are little-endian)."""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_spans(data: bytes) -> tuple[int, list[tuple[str, str, list[int], int, int]]]:
    """Where a LoRA-delta payload's tensors lie in `data`: (header end, [(name, dtype,
    shape, start, end)]). Transports that carry tensors as separate arrays split here."""
    (size,) = struct.unpack("<I", data[3:7])
    header = json.loads(data[7 : 7 + size])
    spans, offset = [], 7 + size
    for name, dtype, shape in header["tensors"]:
        nbytes = _numel(shape) * _DTYPES[dtype].itemsize
        spans.append((name, dtype, shape, offset, offset + nbytes))
        offset += nbytes
    return 7 + size, spans


def _numel(shape: list[int]) -> int:
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"bad shape {shape!r}")
    out = 1
    for d in shape:
        out *= d
    return out


def _tensors(specs: list, blob: bytes) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, dtype, shape in specs:
        if dtype not in _DTYPES:
            raise ValueError(f"{name}: unsupported dtype {dtype!r}")
        nbytes = _numel(shape) * _DTYPES[dtype].itemsize
        if offset + nbytes > len(blob):
            raise ValueError(f"{name}: data ends early")
        chunk = bytearray(blob[offset : offset + nbytes])
        out[str(name)] = torch.frombuffer(chunk, dtype=_DTYPES[dtype]).reshape(shape)
        offset += nbytes
    if offset != len(blob):
        raise ValueError(f"{len(blob) - offset} bytes after the last tensor")
    return out


def _seed_scalars(header: dict, blob: bytes) -> SeedScalars:
    size, counts = int(header["pool_size"]), [int(c) for c in header["counts"]]
    n = sum(counts)
    values = struct.unpack(f"<{n}I{n}d", blob)
    indices, scalars = values[:n], values[n:]
    rounds, at = [], 0
    for count in counts:
        dense = [0.0] * size
        for k, a in zip(indices[at : at + count], scalars[at : at + count], strict=True):
            if k >= size:
                raise ValueError(f"seed index {k} outside the pool of {size}")
            dense[k] = a
        rounds.append(dense)
        at += count
    return SeedScalars(rounds, int(header["first_round"]), size)
