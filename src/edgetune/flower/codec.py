"""Payloads as Flower records, byte for byte.

An edgetune payload is `encode(x)` = a header (magic, length, JSON) followed by its data.
In a Flower message that becomes:

- ConfigRecord "edgetune.head" = {"head": the header bytes};
- LoRA deltas: ArrayRecord "edgetune.tensors" with ONE Array "data" (stype
  "edgetune.raw", dtype "U8", shape (n,)) holding every tensor's raw little-endian bytes
  back to back, in the header's order; the header says where each tensor lies;
- traces and seed scalars: {"data": the packed seeds/indices and scalars} in the same
  ConfigRecord (no arrays).

So the payload bytes a message carries (`payload_bytes`) equal `len(encode(x))`, the
figure the simulator reports; Flower adds its own framing around them (`carried_bytes`).
The receiver re-joins the bytes and parses them with `decode`, which validates the
header and never unpickles anything.

Why one Array and not one per tensor: Flower 1.41 moves every Array as objects of its
own (an Array plus its chunks, each pushed and pulled by a separate request through the
SuperLink and the SuperNode), so the per-object cost dominates a LoRA delta's many small
tensors. Measured on loopback (one SuperNode, 2-core machine, a ClientApp that echoes
what it gets, 3 messages each): 9.8 MB as 420 Arrays took 19.2 s from push to reply, as
one Array 5.4 s, and an empty message 4.3 s; 15 s less per round trip of a SmolLM2 LoRA
delta. Flower cuts the one Array into 5 MB chunks, so no message part grows large.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord

from edgetune.fed.wire import PayloadError, header_end, split, tensor_spans

if TYPE_CHECKING:
    from edgetune.fed.payloads import Payload

HEAD, TENSORS, RAW = "edgetune.head", "edgetune.tensors", "edgetune.raw"
DATA, BYTES = "data", "U8"


def to_records(payload: Payload) -> dict[str, Any]:
    """Flower records (name -> ConfigRecord/ArrayRecord) carrying `encode(payload)`."""
    from edgetune.fed.payloads import encode

    return records_of(encode(payload))


def records_of(data: bytes) -> dict[str, Any]:
    """Flower records carrying the `encode` bytes `data`."""
    from flwr.app import Array

    header, _ = split(data[: header_end(data)])
    if header.get("kind") != "lora_delta":
        end = header_end(data)
        return {HEAD: ConfigRecord({"head": data[:end], "data": data[end:]})}
    end, _ = tensor_spans(data)
    arrays = ArrayRecord()
    arrays[DATA] = Array(dtype=BYTES, shape=(len(data) - end,), stype=RAW, data=data[end:])
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
    end, spans = tensor_spans(head)
    size = (spans[-1][4] if spans else end) - end
    if list(arrays.keys()) != [DATA]:
        raise PayloadError(f"the message's tensors must be one array {DATA!r}")
    array = arrays[DATA]
    if array.stype != RAW or array.dtype != BYTES or list(array.shape) != [size]:
        raise PayloadError(f"the message's tensor array does not match the header ({size} bytes)")
    if not isinstance(array.data, bytes) or len(array.data) != size:
        raise PayloadError(f"the message's tensor array holds the wrong size, expected {size}")
    return head + array.data


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
    from edgetune.fed.payloads import decode

    return decode(join(content))


def payload_bytes(content: Any) -> int:
    """Payload bytes a message carries: equals `len(encode(x))` of what was sent."""
    return len(join(content))


def carried_bytes(message: Any) -> int:
    """Everything Flower serializes for a message's content (payload plus framing)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message.content).values())
