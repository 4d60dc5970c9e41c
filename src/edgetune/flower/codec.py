"""Payloads as Flower records, byte for byte.

An edgetune payload is `encode(x)` = a header (magic, length, JSON) followed by its data.
In a Flower message that becomes:

- ConfigRecord "edgetune.head" = {"head": the header bytes};
- LoRA deltas: ArrayRecord "edgetune.tensors" with one Array per tensor whose data is the
  tensor's raw little-endian bytes (stype "edgetune.raw");
- traces and seed scalars: {"data": the packed seeds/indices and scalars} in the same
  ConfigRecord (no arrays).

So the payload bytes a message carries (`payload_bytes`) equal `len(encode(x))`, the
figure the simulator reports; Flower adds its own framing around them (`carried_bytes`).
The receiver re-joins the bytes and parses them with `decode`, which validates the
header and never unpickles anything.
"""

from __future__ import annotations

from typing import Any

from edgetune.errors import EdgetuneError
from edgetune.fed.payloads import LoraDelta, Payload, decode, encode, tensor_spans

HEAD, TENSORS, RAW = "edgetune.head", "edgetune.tensors", "edgetune.raw"


def to_records(payload: Payload) -> dict[str, Any]:
    """Flower records (name -> ConfigRecord/ArrayRecord) carrying `encode(payload)`."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    data = encode(payload)
    if not isinstance(payload, LoraDelta):
        end = header_end(data)
        return {HEAD: ConfigRecord({"head": data[:end], "data": data[end:]})}
    end, spans = tensor_spans(data)
    arrays = ArrayRecord()
    for name, dtype, shape, start, stop in spans:
        arrays[name] = Array(dtype=dtype, shape=tuple(shape), stype=RAW, data=data[start:stop])
    return {HEAD: ConfigRecord({"head": data[:end]}), TENSORS: arrays}


def join(content: Any) -> bytes:
    """The `encode` bytes carried by a message's RecordDict `content`.

    Raises:
        EdgetuneError: the message carries no edgetune payload or a malformed one.
    """
    try:
        head = content[HEAD]["head"]
        if TENSORS not in content:
            return bytes(head) + bytes(content[HEAD]["data"])
        _, spans = tensor_spans(bytes(head) + b"")
        arrays = content[TENSORS]
        parts = [bytes(head)]
        for name, dtype, shape, start, stop in spans:
            array = arrays[name]
            if array.stype != RAW or array.dtype != dtype or list(array.shape) != shape:
                raise EdgetuneError(f"tensor {name}: array does not match the header")
            if len(array.data) != stop - start:
                raise EdgetuneError(
                    f"tensor {name}: {len(array.data)} bytes, expected {stop - start}"
                )
            parts.append(bytes(array.data))
        if set(arrays.keys()) != {s[0] for s in spans}:
            raise EdgetuneError("the message's arrays differ from the tensors its header lists")
        return b"".join(parts)
    except (KeyError, TypeError, ValueError) as exc:
        raise EdgetuneError(f"message carries no valid edgetune payload ({exc})") from None


def from_records(content: Any) -> Payload:
    """Decode (and validate the format of) the payload in a message's content."""
    return decode(join(content))


def payload_bytes(content: Any) -> int:
    """Payload bytes a message carries: equals `len(encode(x))` of what was sent."""
    return len(join(content))


def carried_bytes(message: Any) -> int:
    """Everything Flower serializes for a message's content (payload plus framing)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message.content).values())


def header_end(data: bytes) -> int:
    """Length of the magic + size + JSON header at the start of `encode` bytes."""
    return 7 + int.from_bytes(data[3:7], "little")
