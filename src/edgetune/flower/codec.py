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

import json
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord

from edgetune.fed.payloads import Payload, PayloadError, decode, encode, tensor_spans

HEAD, TENSORS, RAW = "edgetune.head", "edgetune.tensors", "edgetune.raw"


def to_records(payload: Payload) -> dict[str, Any]:
    """Flower records (name -> ConfigRecord/ArrayRecord) carrying `encode(payload)`."""
    return records_of(encode(payload))


def records_of(data: bytes) -> dict[str, Any]:
    """Flower records carrying the `encode` bytes `data`."""
    from flwr.app import Array

    if json.loads(data[7 : header_end(data)]).get("kind") != "lora_delta":
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
        PayloadError: the message carries no edgetune payload or a malformed one (any
            record of the wrong type, header bytes that do not parse, arrays that differ
            from the header); never another exception, whatever a peer sent.
    """
    head = _bytes(_record(content, HEAD, ConfigRecord), "head")
    if TENSORS not in content:
        return head + _bytes(content[HEAD], "data")
    arrays = _record(content, TENSORS, ArrayRecord)
    _, spans = tensor_spans(head)
    if set(arrays.keys()) != {s[0] for s in spans}:
        raise PayloadError("the message's arrays differ from the tensors its header lists")
    parts = [head]
    for name, dtype, shape, start, stop in spans:
        array = arrays[name]
        if array.stype != RAW or array.dtype != dtype or list(array.shape) != shape:
            raise PayloadError(f"tensor {name[:60]}: array does not match the header")
        if not isinstance(array.data, bytes) or len(array.data) != stop - start:
            raise PayloadError(f"tensor {name[:60]}: wrong data size, expected {stop - start}")
        parts.append(array.data)
    return b"".join(parts)


def _record(content: Any, name: str, kind: type) -> Any:
    """content[name] if it is a record of type `kind`."""
    record = content.get(name) if hasattr(content, "get") else None
    if not isinstance(record, kind):
        raise PayloadError(f"message carries no edgetune payload ({name} is not a {kind.__name__})")
    return record


def _bytes(record: Any, key: str) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes):
        raise PayloadError(f"message carries no edgetune payload ({HEAD}.{key} is not bytes)")
    return value


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
