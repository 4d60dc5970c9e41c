"""The long-lived edgetune worker that trains for a Flower SuperNode.

Flower 1.41 starts a fresh `flwr-clientapp` process for every message, which would import
torch and transformers, load the model and build the data again each time (4.4 s for
SmolLM2-135M before any training). A worker runs beside the SuperNode for as long as the
device serves, keeps the session (model, data, algorithm) of the run it last trained for,
and does the training; the ClientApp only forwards the message to it:

    python -m edgetune.flower.worker --socket /run/edgetune/worker.sock --threads 4
    flower-supernode ... --node-config "partition-id=3 device=rpi5 worker=/run/edgetune/worker.sock"

Protocol (`edgetune.flower.channel` frames, one request per connection, served one at a
time in arrival order):

- ping: header {"op": "ping"} -> {"ok": true, "pid": ...};
- train: header {"op": "train", "config": run config text, "client": partition id,
  "control": {...}, "state": whether a state blob follows}, blobs [payload, state or b""]
  -> header {"ok": bool, "error": str, "metrics": {...}, "state": bool,
  "setup_s": seconds spent building the session (0 when it was kept)}, blobs
  [update, new state or b""].

A session is `ClientSession(config_text)` (`edgetune.fed.client`), keyed by the sha256 of
the config text; a new config replaces the kept session (a device trains one run at a
time, and a SmolLM2 session holds about 1 GB). An exception while building or training
becomes a reply with ok=false and the message; the worker keeps serving. The device's
state between rounds still travels with each message (Flower keeps it in the context
state), so a worker that restarts loses nothing but its warm session.

`forward` is the ClientApp's side: standard library only (with this module's imports),
so the ClientApp process never imports torch when a worker serves it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edgetune import threads
from edgetune.errors import EdgetuneError
from edgetune.flower.channel import ChannelError, listen, read_frame, request, write_frame

DEFAULT_SESSION = "edgetune.fed.client:ClientSession"
REQUEST_READ_S = 60.0  # a client that connects and stalls cannot hold the worker longer


class WorkerError(EdgetuneError):
    """The worker could not be reached, died mid-request, or failed the request."""


class Session(Protocol):
    """What the worker keeps per run: `edgetune.fed.client.ClientSession`."""

    def train(
        self, client: int, control: dict, payload: bytes, state: bytes | None
    ) -> tuple[bytes, bytes | None, dict[str, float]]: ...


SessionFactory = Callable[[str], Session]


class Worker:
    """Answers requests with the session it keeps (built by `make_session(config_text)`)."""

    def __init__(self, make_session: SessionFactory) -> None:
        self.make_session = make_session
        self.key: str | None = None
        self.session: Session | None = None

    def handle(self, header: dict[str, Any], blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        """The reply (header, blobs) to one request; never raises."""
        op = header.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}, []
        if op != "train":
            return _failure(f"unknown request {str(op)[:40]!r} (expected ping or train)"), []
        problem = _check_train(header, blobs)
        if problem:
            return _failure(f"malformed train request: {problem}"), []
        start = time.perf_counter()
        try:
            setup_s = self.open(header["config"])
            update, state, metrics = self.session.train(
                header["client"], header["control"], blobs[0], blobs[1] if header["state"] else None
            )
        except Exception as err:  # any session failure is reported, the worker goes on
            _log(header, time.perf_counter() - start, f"failed: {err!r}")
            return _failure(f"{err.__class__.__name__}: {err}"), []
        _log(header, time.perf_counter() - start, f"ok (setup {setup_s:.2f} s)")
        reply = {
            "ok": True,
            "error": "",
            "metrics": {str(k): float(v) for k, v in metrics.items()},
            "state": state is not None,
            "setup_s": setup_s,
        }
        return reply, [update, state or b""]

    def open(self, config_text: str) -> float:
        """Keep the session for `config_text`; seconds spent building it (0 if kept)."""
        key = hashlib.sha256(config_text.encode()).hexdigest()
        if key == self.key:
            return 0.0
        start = time.perf_counter()
        self.key, self.session = None, None  # free the old session before building anew
        self.session = self.make_session(config_text)
        self.key = key
        return time.perf_counter() - start


def _check_train(header: dict[str, Any], blobs: list[bytes]) -> str:
    """What is wrong with a train request, or "" when it is well formed."""
    if not isinstance(header.get("config"), str):
        return "'config' must be the run config text"
    if type(header.get("client")) is not int:
        return "'client' must be an integer partition id"
    if not isinstance(header.get("control"), dict):
        return "'control' must be an object"
    if not isinstance(header.get("state"), bool):
        return "'state' must be true or false"
    if len(blobs) != 2:
        return f"expected 2 blobs (payload, state), got {len(blobs)}"
    return ""


def _failure(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message, "metrics": {}, "state": False, "setup_s": 0.0}


def _log(header: dict[str, Any], seconds: float, outcome: str) -> None:
    control = header.get("control") or {}
    print(
        f"worker: client {header.get('client')} round {control.get('round', '?')} "
        f"{seconds:.2f} s {outcome}",
        file=sys.stderr,
        flush=True,
    )


def serve(
    path: str | Path, make_session: SessionFactory | None = None, requests: int | None = None
) -> None:
    """Serve requests at the Unix socket `path`, one at a time, until stopped (SIGTERM or
    SIGINT) or `requests` were served. The socket file is removed on the way out.

    Args:
        path: where to listen (created with mode 0600; a stale socket is replaced).
        make_session: builds a session from a run's config text (default: `ClientSession`,
            imported when the first train request comes).
        requests: stop after this many requests (None = serve forever).
    """
    worker = Worker(make_session or load_factory(DEFAULT_SESSION))
    server = listen(path)
    print(f"worker: pid {os.getpid()} listening on {path}", file=sys.stderr, flush=True)
    served = 0
    try:
        while requests is None or served < requests:
            conn, _ = server.accept()
            with conn:
                try:
                    header, blobs = read_frame(conn, time.monotonic() + REQUEST_READ_S)
                except ChannelError as err:
                    print(f"worker: bad request: {err}", file=sys.stderr, flush=True)
                    continue
                reply, out = worker.handle(header, blobs)
                try:  # the ClientApp may have given up waiting: keep serving the next
                    write_frame(conn, reply, out, time.monotonic() + REQUEST_READ_S)
                except ChannelError as err:
                    print(f"worker: reply not delivered: {err}", file=sys.stderr, flush=True)
            served += 1
    finally:
        server.close()
        Path(path).unlink(missing_ok=True)


def load_factory(spec: str) -> SessionFactory:
    """The session factory named `module:callable`, imported on first use."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise EdgetuneError(f"--session-factory {spec!r}: expected module:callable")

    def make(config_text: str) -> Session:
        return getattr(importlib.import_module(module), name)(config_text)

    return make


def forward(
    socket_path: str | Path,
    config_text: str,
    client: int,
    control: dict[str, Any],
    payload: bytes,
    state: bytes | None,
    timeout: float,
) -> tuple[bytes, bytes | None, dict[str, float]]:
    """Have the worker at `socket_path` train one round; the ClientApp's side.

    Args:
        socket_path: the worker's socket (the SuperNode's `worker` node config).
        config_text: the run's resolved config (YAML text).
        client: the device's partition id.
        control: the round's control values (round, method, rank, ...), JSON-serializable.
        payload: the server's encoded payload.
        state: the device's encoded state from its last round, or None.
        timeout: seconds to wait for the reply (building the session included).

    Returns:
        (encoded update, encoded new state or None, metrics with the worker's `setup_s`:
        the seconds it spent building the session, 0 when it kept it).

    Raises:
        WorkerError: the worker is unreachable, died or stalled mid-request, sent a
            malformed reply, or replied that the session failed (with its message).
    """
    header = {"op": "train", "config": config_text, "client": client, "control": control}
    header["state"] = state is not None
    try:
        reply, blobs = request(socket_path, header, [payload, state or b""], timeout)
    except ChannelError as err:
        raise WorkerError(
            f"the edgetune worker at {socket_path} did not answer: {err}. Is it running? Start "
            f"it with `python -m edgetune.flower.worker --socket {socket_path}` (its log says "
            "why it stopped), or drop worker= from the SuperNode's --node-config to train "
            "in the ClientApp"
        ) from err
    if reply.get("ok") is not True:
        raise WorkerError(f"the edgetune worker at {socket_path} failed: {reply.get('error')}")
    metrics = reply.get("metrics")
    if len(blobs) != 2 or not isinstance(metrics, dict) or not isinstance(reply.get("state"), bool):
        raise WorkerError(f"the edgetune worker at {socket_path} sent a malformed reply")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()):
        raise WorkerError(f"the edgetune worker at {socket_path} sent non-numeric metrics")
    setup_s = reply.get("setup_s", 0.0)
    if not isinstance(setup_s, int | float) or isinstance(setup_s, bool):
        raise WorkerError(f"the edgetune worker at {socket_path} sent a non-numeric setup_s")
    values = {k: float(v) for k, v in metrics.items()}
    return blobs[0], blobs[1] if reply["state"] else None, {**values, "setup_s": float(setup_s)}


def ping(socket_path: str | Path, timeout: float = 5.0) -> int:
    """The pid of the worker answering at `socket_path`.

    Raises:
        WorkerError: no worker answers there.
    """
    try:
        reply, _ = request(socket_path, {"op": "ping"}, [], timeout)
    except ChannelError as err:
        raise WorkerError(f"no edgetune worker answers at {socket_path}: {err}") from err
    if reply.get("ok") is not True or type(reply.get("pid")) is not int:
        raise WorkerError(f"{socket_path} answered a ping with {reply!r}")
    return reply["pid"]


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    """`python -m edgetune.flower.worker --socket PATH [--threads N]`."""
    parser = argparse.ArgumentParser(
        prog="python -m edgetune.flower.worker", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--socket", required=True, help="Unix socket to listen on")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for training (0 = OMP_NUM_THREADS, else the free cores)",
    )
    parser.add_argument(
        "--session-factory",
        default=DEFAULT_SESSION,
        help="module:callable building a session from a run's config text (for tests)",
    )
    args = parser.parse_args(argv)
    try:
        count = threads.resolve(args.threads or None)
        # set before torch is imported (by the first session), so torch starts with them
        os.environ.update(threads.child_env(count.count, {}))
        signal.signal(signal.SIGTERM, _stop)
        print(f"worker: {count}", file=sys.stderr, flush=True)
        serve(args.socket, load_factory(args.session_factory))
    except EdgetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
