"""Updates and broadcasts as typed values, and their wire format.

Three kinds of client update:
- `LoraDelta`: theta_local - theta_global for each adapter tensor (FedIT, first-order).
- `ZOTrace`: a list of (seed index, scalar) pairs from a seed pool, plus the lr of each
  step (FedKSeed); a few bytes per local step, whatever the model size.
- `SeedTrace`: (seed, coefficient) per ZO direction, which the server replays into a
  delta (ZO devices in FedIT/FwdLLM hybrid fleets); 16 bytes a direction.

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

from edgetune.errors import EdgetuneError

_MAGIC = b"ET1"

# What a decoder accepts at most (so a forged header cannot make it allocate without
# limit): far above any real payload (a LoRA of a 1B model has ~10M values per tensor;
# FedKSeed pools are ~1-4K seeds; traces a few hundred directions).
MAX_TENSORS, MAX_NUMEL = 4096, 1 << 28
MAX_TRACE, MAX_POOL, MAX_ROUNDS = 1 << 20, 1 << 20, 1 << 24
MAX_SCALARS = 1 << 24  # rounds x pool_size of a SeedScalars broadcast
MAX_EXAMPLES = (1 << 63) - 1


class PayloadError(EdgetuneError):
    """Bytes that are not a well-formed edgetune payload (the peer that sent them is at
    fault; a server rejects that reply and goes on)."""


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


@dataclass
class ClientState:
    """What a device keeps between rounds: named tensors and a few numbers."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)


Payload = LoraDelta | ZOTrace | SeedTrace | SeedScalars | ClientState


def encode(payload: Payload) -> bytes:
    """Serialize a payload (the exact bytes a transport would carry)."""
    if isinstance(payload, LoraDelta | ClientState):
        tensors = [(k, v.detach().contiguous().cpu()) for k, v in payload.tensors.items()]
        blob = b"".join(_raw(v) for _, v in tensors)
        header = {"tensors": [[k, _DTYPE_NAMES[v.dtype], list(v.shape)] for k, v in tensors]}
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
    """Parse bytes from `encode`.

    Raises:
        PayloadError: for any malformed input (and no other exception): bad magic, a
            header that is not a JSON object of the expected fields, sizes that do not
            match the data, unknown dtypes, or a declared size beyond the limits.
    """
    header, blob = _split(data)
    kind = header.get("kind")
    if kind == "lora_delta":
        return LoraDelta(_tensors(_specs(header), blob), _count(header), _meta(header))
    if kind == "client_state":
        return ClientState(_tensors(_specs(header), blob), _meta(header))
    if kind == "seed_scalars":
        return _seed_scalars(header, blob)
    if kind not in ("zo_trace", "seed_trace"):
        raise PayloadError(f"unknown payload kind {kind!r}")
    n = _int(header, "n", MAX_TRACE)
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


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(JSON header as a dict, the data after it) of `encode` bytes."""
    if not isinstance(data, bytes | bytearray) or len(data) < 7 or data[:3] != _MAGIC:
        raise PayloadError("payload is not an edgetune update (bad magic or too short)")
    size = int.from_bytes(data[3:7], "little")
    if 7 + size > len(data):
        raise PayloadError(f"payload header declares {size} bytes but the payload ends early")
    try:
        header = json.loads(data[7 : 7 + size])
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8, or absurd nesting
        raise PayloadError(f"payload header is not JSON: {str(exc)[:80]}") from None
    if not isinstance(header, dict):
        raise PayloadError(f"payload header is a JSON {type(header).__name__}, not an object")
    return header, bytes(data[7 + size :])


def _int(header: dict[str, Any], key: str, limit: int) -> int:
    """header[key] as an int in [0, limit]."""
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise PayloadError(
            f"payload header: {key} must be an integer in [0, {limit}], got {str(value)[:40]}"
        )
    return value


def _count(header: dict[str, Any]) -> int:
    return _int(header, "num_examples", MAX_EXAMPLES)


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
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's little-endian bytes (x86 and ARM hosts are little-endian)."""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_spans(data: bytes) -> tuple[int, list[tuple[str, str, list[int], int, int]]]:
    """Where a LoRA-delta payload's tensors lie in `data`: (header end, [(name, dtype,
    shape, start, end)]). Transports that carry tensors as separate arrays split here;
    `data` may be the header alone (the spans then point past its end).

    Raises:
        PayloadError: the header is malformed or not a LoRA delta's.
    """
    header, _ = _split(data)
    if header.get("kind") != "lora_delta":
        raise PayloadError(f"expected a lora_delta header, got kind {header.get('kind')!r}")
    end = 7 + int.from_bytes(data[3:7], "little")
    spans, offset = [], end
    for name, dtype, shape in _specs(header):
        nbytes = _numel(shape) * _DTYPES[dtype].itemsize
        spans.append((name, dtype, shape, offset, offset + nbytes))
        offset += nbytes
    return end, spans


def _specs(header: dict[str, Any]) -> list[tuple[str, str, list[int]]]:
    """The header's tensor list as (name, dtype, shape), checked: unique string names,
    known dtypes, shapes of non-negative ints."""
    specs = header.get("tensors")
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise PayloadError(f"payload header: tensors must be a list of at most {MAX_TENSORS}")
    out, names = [], set()
    for spec in specs:
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str)):
            raise PayloadError("payload header: each tensor must be [name, dtype, shape]")
        name, dtype, shape = spec
        if name in names:
            raise PayloadError(f"payload header: tensor {name[:60]!r} is listed twice")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise PayloadError(f"{name[:60]}: unsupported dtype {str(dtype)[:20]!r}")
        _numel(shape)
        names.add(name)
        out.append((name, dtype, shape))
    return out


def _numel(shape: Any) -> int:
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise PayloadError(f"bad tensor shape {str(shape)[:60]}")
    out = 1
    for d in shape:
        out *= d
    if out > MAX_NUMEL:
        raise PayloadError(f"tensor shape {shape} has more than {MAX_NUMEL} values")
    return out


def _tensors(specs: list[tuple[str, str, list[int]]], blob: bytes) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, dtype, shape in specs:
        nbytes = _numel(shape) * _DTYPES[dtype].itemsize
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
    size = _int(header, "pool_size", MAX_POOL)
    counts = header.get("counts")
    if not isinstance(counts, list) or len(counts) * max(size, 1) > MAX_SCALARS:
        raise PayloadError(
            f"payload header: counts must be a list, with rounds x pool_size <= {MAX_SCALARS}"
        )
    counts = [_int({"count": c}, "count", size) for c in counts]
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
    return SeedScalars(rounds, _int(header, "first_round", MAX_ROUNDS), size)
