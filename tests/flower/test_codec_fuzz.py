"""Fuzzing the payload decoder and the Flower codec: whatever bytes or records a peer
sends, `decode` and `join` raise `PayloadError` or return a payload; nothing else escapes.

Deterministic (seeded) mutations of real payloads of every kind: bit flips, truncation,
appended bytes, header edits (wrong types, shapes, dtypes, lengths, huge declared sizes,
non-object JSON), and for Flower records: missing or retyped records, arrays whose
dtype, shape, stype or data disagree with the header.
"""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch

from edgetune.fed.payloads import (
    LoraDelta,
    PayloadError,
    ProjectedRounds,
    Projection,
    SeedScalars,
    SeedTrace,
    ZOTrace,
    decode,
    encode,
)
from edgetune.fed.wire import tensor_spans

flwr_app = pytest.importorskip("flwr.app")
from edgetune.flower.codec import HEAD, RAW, TENSORS, from_records, join, to_records  # noqa: E402


def _payloads() -> list:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.lora_A": torch.randn(2, 6, generator=gen),
        "a.lora_B": torch.randn(6, 2, generator=gen).to(torch.float16),
        "b": torch.randn(3, generator=gen).to(torch.bfloat16),
    }
    return [
        LoraDelta(tensors, 7, {"loss": 1.5}),
        ZOTrace([1, 5, 9], [0.5, -2.0, 3.0], [1e-3] * 3, 4, {"loss": 2.0}),
        SeedTrace([11, 2**40, 3], [0.25, -1.0, 1e-9], 5, {"loss": 2.0, "rank": 2.0}),
        SeedScalars([[0.0, 1.5, 0.0, -2.0], [0.0] * 4, [3.0, 0.0, 0.0, 0.0]], 2, 4),
        Projection(2**62 + 3, torch.randn(5, generator=gen), 29, 6, {"loss": 0.5}),
        ProjectedRounds(9, 1, 29, 3, [4, 2**63 + 1], [torch.ones(3), torch.zeros(3)]),
        ProjectedRounds(9, 4, 29, 3, tensors=tensors),
    ]


_HEADER_EDITS = [
    lambda h: [],
    lambda h: "x",
    lambda h: 5,
    lambda h: None,
    lambda h: {**h, "kind": "nope"},
    lambda h: {**h, "kind": 3},
    lambda h: {k: v for k, v in h.items() if k != "num_examples"},
    lambda h: {**h, "num_examples": -1},
    lambda h: {**h, "num_examples": 1.5},
    lambda h: {**h, "num_examples": "7"},
    lambda h: {**h, "num_examples": 10**400},
    lambda h: {**h, "num_examples": True},
    lambda h: {**h, "meta": []},
    lambda h: {**h, "meta": {"loss": "high"}},
    lambda h: {**h, "meta": {"loss": 1e999}},
    lambda h: {**h, "meta": {"loss": None}},
    lambda h: {**h, "meta": {str(i): 1.0 for i in range(100)}},
    lambda h: {**h, "n": h.get("n", 0) + 1},
    lambda h: {**h, "n": -1},
    lambda h: {**h, "n": 2**62},
    lambda h: {**h, "n": "3"},
    lambda h: {**h, "pool_size": 2**62},
    lambda h: {**h, "pool_size": -4},
    lambda h: {**h, "pool_size": 2},
    lambda h: {**h, "counts": [2**40]},
    lambda h: {**h, "counts": "abc"},
    lambda h: {**h, "counts": [1, -1, 0]},
    lambda h: {**h, "counts": [0] * 10**6},
    lambda h: {**h, "k": h.get("k", 0) + 1},
    lambda h: {**h, "k": 2**40},
    lambda h: {**h, "rounds": h.get("rounds", 0) + 1},
    lambda h: {**h, "rounds": 2**30},
    lambda h: {**h, "seed": -1},
    lambda h: {**h, "seed": 2**64},
    lambda h: {**h, "numel": "29"},
    lambda h: {**h, "first_round": -2},
    lambda h: {**h, "first_round": 1e300},
    lambda h: {**h, "tensors": "all"},
    lambda h: {**h, "tensors": [["a", "F32"]]},
    lambda h: {**h, "tensors": [[1, "F32", [2]]]},
    lambda h: {**h, "tensors": [["a", "I64", [2]]]},
    lambda h: {**h, "tensors": [["a", "F32", [2**40, 2**40]]]},
    lambda h: {**h, "tensors": [["a", "F32", [-1]]]},
    lambda h: {**h, "tensors": [["a", "F32", [2.5]]]},
    lambda h: {**h, "tensors": [["a", "F32", "2"]]},
    lambda h: {**h, "tensors": [["a", "F32", [0]]]},
    lambda h: {**h, "tensors": [["a", "F32", [3]], ["a", "F32", [3]]]},
    lambda h: {**h, "tensors": [*(h.get("tensors") or []), ["z", "F64", [1]]]},
    lambda h: {**h, "tensors": (h.get("tensors") or [])[:-1]},
    lambda h: {
        **h,
        "tensors": [
            [t[0], "F32" if t[1] != "F32" else "F16", t[2]] for t in h.get("tensors") or []
        ],
    },  # noqa: E501
]


def _with_header(data: bytes, header) -> bytes:
    size = int.from_bytes(data[3:7], "little")
    head = json.dumps(header).encode()
    return data[:3] + struct.pack("<I", len(head)) + head + data[7 + size :]


def _mutants(data: bytes, rng: random.Random) -> list[bytes]:
    size = int.from_bytes(data[3:7], "little")
    header = json.loads(data[7 : 7 + size])
    out = [data[:i] for i in range(0, len(data), max(1, len(data) // 40))]
    out += [_with_header(data, edit(header)) for edit in _HEADER_EDITS]
    out += [data + b"\x00", data + bytes(rng.randrange(256) for _ in range(9))]
    out += [data[:3] + struct.pack("<I", v) + data[7:] for v in (0, 1, size - 1, 2**32 - 1)]
    out += [data[:7] + b"[1, 2]" + data[7 + size :], data[:7] + b"\xff\xfe" + data[9:]]
    out += [data[:7] + b"[" * 5000 + data[7 + size :]]
    for _ in range(300):
        flipped = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(flipped))
            flipped[i] ^= 1 << rng.randrange(8)
        out.append(bytes(flipped))
    for _ in range(100):  # random bytes inside the JSON header only
        head = bytearray(data[7 : 7 + size])
        head[rng.randrange(len(head))] = rng.randrange(32, 127)
        out.append(data[:7] + bytes(head) + data[7 + size :])
    return out


def test_decode_raises_only_payload_errors_on_thousands_of_mutants():
    # Prepare
    rng = random.Random(1234)
    mutants = [m for p in _payloads() for m in _mutants(encode(p), rng)]
    mutants += [b"", b"ET", b"ET1", b"ET1\x00\x00", b"ET1\x02\x00\x00\x00{}", b"pickle"]
    # Execute
    outcomes = {"ok": 0, "rejected": 0}
    for data in mutants:
        try:
            decode(data)
            outcomes["ok"] += 1
        except PayloadError:
            outcomes["rejected"] += 1
    # Assert: every mutant either parsed or was rejected; most were rejected
    assert len(mutants) > 2000
    assert outcomes["ok"] + outcomes["rejected"] == len(mutants)
    assert outcomes["rejected"] > len(mutants) // 4


@pytest.mark.parametrize(
    "header, message",
    [
        (b"[1, 2]", "not an object"),
        (b'"kind"', "not an object"),
        (b"{}", "unknown payload kind"),
    ],
)
def test_decode_names_what_is_wrong(header, message):
    data = b"ET1" + struct.pack("<I", len(header)) + header
    with pytest.raises(PayloadError, match=message):
        decode(data)


def test_decode_round_trips_every_payload_kind():
    for payload in _payloads():
        back = decode(encode(payload))
        assert type(back) is type(payload) and encode(back) == encode(payload)


def _record_mutants(payload, rng: random.Random) -> list:
    """RecordDicts carrying `payload`, each with one thing wrong."""
    Array, ArrayRecord, ConfigRecord, RecordDict = (
        flwr_app.Array,
        flwr_app.ArrayRecord,
        flwr_app.ConfigRecord,
        flwr_app.RecordDict,
    )
    records = to_records(payload)
    head = records[HEAD]["head"]
    out = [RecordDict({}), RecordDict({HEAD: ArrayRecord()})]
    for value in (b"", b"ET1", 10**12, "ET1", [1, 2], 3.5, True):
        out.append(RecordDict({**records, HEAD: ConfigRecord({"head": value, "data": b""})}))
    for m in _mutants(head + (records[HEAD]["data"] if TENSORS not in records else b""), rng)[::3]:
        split = min(len(m), len(head))
        config = ConfigRecord({"head": m[:split], "data": m[split:]})
        out.append(RecordDict({**records, HEAD: config}))
    if TENSORS in records:
        arrays = records[TENSORS]
        names = list(arrays.keys())
        out.append(RecordDict({HEAD: records[HEAD], TENSORS: ConfigRecord({"x": 1})}))
        for name in names:
            a = arrays[name]
            for dtype, shape, stype, data in (
                ("F64", a.shape, a.stype, a.data),
                (a.dtype, (1, *a.shape), a.stype, a.data),
                (a.dtype, a.shape, "numpy.ndarray", a.data),
                (a.dtype, a.shape, RAW, a.data[:-1]),
                (a.dtype, a.shape, RAW, a.data + b"\x00"),
                (a.dtype, a.shape, RAW, b""),
            ):
                changed = ArrayRecord()
                for other in names:
                    changed[other] = arrays[other]
                changed[name] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)
                out.append(RecordDict({HEAD: records[HEAD], TENSORS: changed}))
            fewer = ArrayRecord()
            for other in names:
                if other != name:
                    fewer[other] = arrays[other]
            out.append(RecordDict({HEAD: records[HEAD], TENSORS: fewer}))
        extra = ArrayRecord()
        for other in names:
            extra[other] = arrays[other]
        extra["z"] = Array(dtype="F32", shape=(1,), stype=RAW, data=b"\x00" * 4)
        out.append(RecordDict({HEAD: records[HEAD], TENSORS: extra}))
        per_tensor = ArrayRecord()  # the layout before one array carried every tensor
        data = arrays[names[0]].data
        _, spans = tensor_spans(head)
        end = spans[0][3]
        for name, dtype, shape, start, stop in spans:
            raw = data[start - end : stop - end]
            per_tensor[name] = Array(dtype=dtype, shape=tuple(shape), stype=RAW, data=raw)
        out.append(RecordDict({HEAD: records[HEAD], TENSORS: per_tensor}))
    return out


def test_flower_records_raise_only_payload_errors():
    # Prepare
    rng = random.Random(99)
    mutants = [m for p in _payloads() for m in _record_mutants(p, rng)]
    # Execute
    rejected = 0
    for content in mutants:
        try:
            from_records(content)
        except PayloadError:
            rejected += 1
    # Assert: the well-formed records still decode to the payload that was sent
    assert len(mutants) > 300 and rejected > len(mutants) // 4
    for payload in _payloads():
        assert encode(from_records(flwr_app.RecordDict(to_records(payload)))) == encode(payload)
    with pytest.raises(PayloadError, match="not bytes"):
        join(flwr_app.RecordDict({HEAD: flwr_app.ConfigRecord({"head": 10**12})}))


def test_a_lora_delta_travels_as_one_raw_array_of_its_tensor_bytes():
    # Prepare
    delta = _payloads()[0]
    data = encode(delta)
    # Execute
    records = to_records(delta)
    # Assert: one array holding every byte after the header, in the header's order
    arrays = records[TENSORS]
    assert list(arrays.keys()) == ["data"]
    assert arrays["data"].stype == RAW and arrays["data"].dtype == "U8"
    assert records[HEAD]["head"] + arrays["data"].data == data
    assert list(arrays["data"].shape) == [len(data) - len(records[HEAD]["head"])]
