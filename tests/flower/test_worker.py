"""The worker channel's frames and a real worker process serving a fake session.

The worker process gets `--session-factory test_worker:FakeSession` (this file, on its
PYTHONPATH) so it serves without torch or a model: FakeSession counts how often it was
built and echoes what it was sent, fails on `control["fail"]` and exits the process on
`control["exit"]` (a worker dying mid-request).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from edgetune.flower.channel import (
    MAGIC,
    MAX_BLOBS,
    MAX_HEADER_BYTES,
    ChannelError,
    listen,
    read_frame,
    write_frame,
)
from edgetune.flower.worker import Worker, WorkerError, forward, ping

HERE = Path(__file__).parent
SRC = HERE.parents[1] / "src"


class FakeSession:
    """A session that remembers how many were built and echoes its inputs."""

    built = 0

    def __init__(self, config_text: str) -> None:
        if config_text == "broken":
            raise ValueError("cannot build from a broken config")
        FakeSession.built += 1
        self.config = config_text
        self.calls = 0

    def train(
        self, client: int, control: dict, payload: bytes, state: bytes | None
    ) -> tuple[bytes, bytes | None, dict[str, float]]:
        if control.get("fail"):
            raise RuntimeError("boom in round " + str(control["round"]))
        if control.get("exit"):
            os._exit(3)
        self.calls += 1
        new_state = None if control.get("drop-state") else (state or b"") + bytes([client])
        metrics = {"built": FakeSession.built, "calls": self.calls, "round": control["round"]}
        return payload[::-1], new_state, metrics


def _frame(envelope: bytes, blobs: bytes = b"") -> bytes:
    return MAGIC + struct.pack("<I", len(envelope)) + envelope + blobs


def _read_raw(data: bytes, **kwargs):
    a, b = socket.socketpair()

    def send() -> None:  # from a thread: a frame can be larger than the socket's buffer
        with contextlib.suppress(OSError):
            a.sendall(data)
            a.shutdown(socket.SHUT_WR)

    with a, b:
        sender = threading.Thread(target=send)
        sender.start()
        try:
            return read_frame(b, time.monotonic() + 5, **kwargs)
        finally:
            b.close()
            sender.join()


def test_a_frame_round_trips_header_and_raw_blobs():
    # Prepare
    header = {"config": "model: x\nnote: é ü", "client": 3, "control": {"round": 2}}
    blobs = [bytes(range(256)) * 4096, b"", b"\x00" * 7]
    a, b = socket.socketpair()
    # Execute
    with a, b:
        sender = threading.Thread(target=write_frame, args=(a, header, blobs))
        sender.start()
        got_header, got_blobs = read_frame(b, time.monotonic() + 5)
        sender.join()
    # Assert
    assert got_header == header
    assert got_blobs == blobs


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "closed the connection mid-frame"),
        (b"ETC", "closed the connection mid-frame"),
        (b"XXXX" + struct.pack("<I", 2) + b"{}", "not an edgetune channel frame"),
        (MAGIC + struct.pack("<I", MAX_HEADER_BYTES + 1), "exceeds"),
        (MAGIC + struct.pack("<I", 2**32 - 1), "exceeds"),
        (MAGIC + struct.pack("<I", 100) + b"{}", "closed the connection mid-frame"),
        (_frame(b"\xff\xfe"), "not JSON"),
        (_frame(b"{nope"), "not JSON"),
        (_frame(b"[" * 100_000), "not JSON"),
        (_frame(b'{"header": {}, "blobs": [' + b"9" * 5000 + b"]}"), "not JSON"),
        (_frame(b"[1, 2]"), "not an object"),
        (_frame(b'{"header": {}}'), "not an object"),
        (_frame(b'{"header": {}, "blobs": [], "x": 1}'), "not an object"),
        (_frame(b'{"header": [], "blobs": []}'), "must be an object"),
        (_frame(b'{"header": {}, "blobs": 3}'), "must be an object"),
        (_frame(b'{"header": {}, "blobs": [-1]}'), "non-negative integers"),
        (_frame(b'{"header": {}, "blobs": [1.5]}'), "non-negative integers"),
        (_frame(b'{"header": {}, "blobs": [true]}'), "non-negative integers"),
        (_frame(b'{"header": {}, "blobs": ["4"]}'), "non-negative integers"),
        (_frame(json.dumps({"header": {}, "blobs": [0] * 17}).encode()), "more than 16"),
        (_frame(b'{"header": {}, "blobs": [1099511627776]}'), "blob bytes, more than"),
        (_frame(b'{"header": {}, "blobs": [2, 2]}', b"abc"), "mid-frame"),
    ],
)
def test_malformed_or_oversized_frames_raise_channel_error(data, message):
    with pytest.raises(ChannelError, match=message):
        _read_raw(data)


def test_a_frame_larger_than_the_reader_allows_is_refused_before_reading_it():
    # Prepare: a peer declaring 2 MB when the reader allows 1 MB, and sending nothing
    data = _frame(b'{"header": {}, "blobs": [2000000]}')
    # Execute / Assert
    with pytest.raises(ChannelError, match="2000000 blob bytes, more than 1000000"):
        _read_raw(data, max_bytes=1_000_000)


def test_a_stalled_peer_times_out_with_channel_error():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(_frame(b'{"header": {}, "blobs": [10]}', b"abc"))
        start = time.monotonic()
        with pytest.raises(ChannelError, match="timed out"):
            read_frame(b, time.monotonic() + 0.3)
        assert time.monotonic() - start < 2


def test_write_frame_refuses_what_it_cannot_send():
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ChannelError, match="not JSON-serializable"):
            write_frame(a, {"x": object()}, [])
        with pytest.raises(ChannelError, match="too large"):
            write_frame(a, {}, [b""] * (MAX_BLOBS + 1))


def test_listen_refuses_long_paths_and_files_that_are_not_sockets(tmp_path):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ChannelError, match="not a socket"):
        listen(tmp_path / "plain")
    with pytest.raises(ChannelError, match="choose a shorter path"):
        listen(tmp_path / ("d" * 120) / "w.sock")


def test_worker_replies_to_malformed_requests_without_raising():
    # Prepare
    worker = Worker(FakeSession)
    good = {"op": "train", "config": "c", "client": 1, "control": {"round": 1}, "state": False}
    # Execute
    replies = [
        worker.handle({"op": "dance"}, []),
        worker.handle({**good, "client": "1"}, [b"", b""]),
        worker.handle({**good, "control": []}, [b"", b""]),
        worker.handle(good, [b"x"]),
        worker.handle({**good, "config": "broken"}, [b"", b""]),
    ]
    # Assert
    assert [r[0]["ok"] for r in replies] == [False] * 5
    assert "unknown request 'dance'" in replies[0][0]["error"]
    assert "'client' must be an integer" in replies[1][0]["error"]
    assert "'control' must be an object" in replies[2][0]["error"]
    assert "expected 2 blobs" in replies[3][0]["error"]
    assert replies[4][0]["error"] == "ValueError: cannot build from a broken config"


@pytest.fixture
def worker_process(tmp_path):
    """A worker process serving FakeSession at a socket in tmp_path; killed afterwards."""
    path = Path(f"/tmp/et-test-{os.getpid()}-{time.monotonic_ns()}.sock")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)])}
    argv = [sys.executable, "-m", "edgetune.flower.worker", "--socket", str(path)]
    argv += ["--threads", "1", "--session-factory", "test_worker:FakeSession"]
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen(argv, env=env, stderr=log, stdout=log)
    deadline = time.monotonic() + 15
    while True:
        try:
            ping(path, timeout=1)
            break
        except WorkerError:
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, "the worker did not answer within 15 s"
            time.sleep(0.05)
    yield proc, path, tmp_path / "worker.log"
    proc.kill()
    proc.wait()
    path.unlink(missing_ok=True)


def test_a_worker_process_keeps_its_session_and_survives_session_errors(worker_process):
    # Prepare
    proc, path, log = worker_process
    config = "model: stories260k\nseed: 0\n"
    # Execute
    first = forward(path, config, 2, {"round": 1}, b"abc", None, timeout=10)
    second = forward(path, config, 2, {"round": 2}, b"\x00\x01", first[1], timeout=10)
    with pytest.raises(WorkerError, match="failed: RuntimeError: boom in round 3"):
        forward(path, config, 2, {"round": 3, "fail": True}, b"", second[1], timeout=10)
    with pytest.raises(WorkerError, match="cannot build from a broken config"):
        forward(path, "broken", 2, {"round": 3}, b"", None, timeout=10)
    third = forward(path, config, 2, {"round": 4, "drop-state": True}, b"z", None, timeout=10)
    # Assert: one session built for the config, the state carried, the worker still serving
    # the first call built the session (its setup time is reported), the second kept it
    assert first[2].pop("setup_s") > 0 and second[2].pop("setup_s") == 0.0
    assert first == (b"cba", b"\x02", {"built": 1.0, "calls": 1.0, "round": 1.0})
    assert second == (b"\x01\x00", b"\x02\x02", {"built": 1.0, "calls": 2.0, "round": 2.0})
    assert third[1] is None and third[2]["built"] == 2.0 and third[2]["calls"] == 1.0
    assert ping(path) == proc.pid
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("worker: client")]
    assert [ln.split(" s ")[0].rsplit(" ", 1)[0] for ln in lines] == [
        f"worker: client 2 round {r}" for r in (1, 2, 3, 3, 4)
    ]
    assert lines[2].endswith("failed: RuntimeError('boom in round 3')")


def test_forward_raises_worker_error_when_the_worker_dies_or_is_gone(worker_process):
    # Prepare
    proc, path, _ = worker_process
    # Execute / Assert: dying mid-request, then nothing listening
    with pytest.raises(WorkerError, match="closed the connection mid-frame"):
        forward(path, "c", 0, {"round": 1, "exit": True}, b"x", None, timeout=10)
    assert proc.wait(timeout=10) == 3
    with pytest.raises(WorkerError, match="did not answer: nothing listens on"):
        forward(path, "c", 0, {"round": 2}, b"x", None, timeout=10)


def test_a_killed_worker_leaves_forward_a_clear_error(worker_process):
    # Prepare
    proc, path, _ = worker_process
    # Execute
    proc.kill()
    proc.wait(timeout=10)
    # Assert
    with pytest.raises(WorkerError, match=r"Is it running\? Start it with"):
        forward(path, "c", 0, {"round": 1}, b"x", None, timeout=5)


def test_forward_does_not_import_torch():
    # Prepare
    code = "import sys, edgetune.flower.worker; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    # Execute
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    # Assert
    assert done.stdout.strip() == "False", done.stderr


def test_local_federation_starts_a_worker_per_node_and_stops_it_by_name(tmp_path):
    # Prepare: a HOME too deep for a Unix socket path, so the sockets go under /tmp
    from edgetune.flower.local import LocalFederation

    home = tmp_path / ("h" * 100)
    fed = LocalFederation(home, clients=2, insecure=True, threads=1)
    try:
        # Execute
        paths = [fed.start_worker(i) for i in range(2)]
        pids = [ping(p) for p in paths]
        again = fed.start_worker(1)
        fed.kill("worker-0")
        # Assert
        assert pids[1] == fed.procs["worker-1"].pid and pids[0] != pids[1]
        assert str(paths[0]).startswith(tempfile.gettempdir()) and again == paths[1]
        assert oct(paths[0].parent.stat().st_mode & 0o777) == "0o700"
        assert "worker-0" not in fed.procs and ping(paths[1]) == pids[1]
        with pytest.raises(WorkerError, match="no edgetune worker answers"):
            ping(paths[0], timeout=1)
        assert "listening on" in fed.log("worker-1").read_text()
    finally:
        fed.stop()
    assert not paths[0].parent.exists()


def test_local_federation_keeps_worker_sockets_in_home_when_the_path_is_short(tmp_path):
    from edgetune.flower.local import LocalFederation

    home = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        fed = LocalFederation(home, clients=3, insecure=True, threads=1)
        assert fed.worker_socket(2) == fed.home / "workers" / "node-2.sock"
        assert oct((fed.home / "workers").stat().st_mode & 0o777) == "0o700"
    finally:
        shutil.rmtree(home)
