"""The edgetune wire format's framing, without torch: magic, header and tensor layout.

`encode` bytes are `b"ET1"`, a u32 little-endian header length, a JSON header object, then
the data (for tensors: each one's raw little-endian bytes, back to back, in the header's
order). This module parses and checks the framing only, so a process that only moves
payloads (a Flower ClientApp handing a message to its worker) reads them without
importing torch; `edgetune.fed.payloads` turns them into typed values.
"""

from __future__ import annotations

import json
from typing import Any

from edgetune.errors import EdgetuneError

MAGIC = b"ET1"

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


# Bytes per value of each tensor dtype the format carries.
ITEMSIZE = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2, "U8": 1, "I32": 4}


def header_end(data: bytes) -> int:
    """Length of the magic + size + JSON header at the start of `encode` bytes."""
    return 7 + int.from_bytes(data[3:7], "little")


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(JSON header as a dict, the data after it) of `encode` bytes."""
    if not isinstance(data, bytes | bytearray) or len(data) < 7 or data[:3] != MAGIC:
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


def header_int(header: dict[str, Any], key: str, limit: int) -> int:
    """header[key] as an int in [0, limit]."""
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise PayloadError(
            f"payload header: {key} must be an integer in [0, {limit}], got {str(value)[:40]}"
        )
    return value


def tensor_spans(data: bytes) -> tuple[int, list[tuple[str, str, list[int], int, int]]]:
    """Where a LoRA-delta payload's tensors lie in `data`: (header end, [(name, dtype,
    shape, start, end)]). Transports that carry tensors as separate arrays split here;
    `data` may be the header alone (the spans then point past its end).

    Raises:
        PayloadError: the header is malformed or not a LoRA delta's.
    """
    header, _ = split(data)
    if header.get("kind") != "lora_delta":
        raise PayloadError(f"expected a lora_delta header, got kind {header.get('kind')!r}")
    end = 7 + int.from_bytes(data[3:7], "little")
    spans, offset = [], end
    for name, dtype, shape in specs(header):
        nbytes = numel(shape) * ITEMSIZE[dtype]
        spans.append((name, dtype, shape, offset, offset + nbytes))
        offset += nbytes
    return end, spans


def specs(header: dict[str, Any]) -> list[tuple[str, str, list[int]]]:
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
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise PayloadError(f"{name[:60]}: unsupported dtype {str(dtype)[:20]!r}")
        numel(shape)
        names.add(name)
        out.append((name, dtype, shape))
    return out


def numel(shape: Any) -> int:
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
