"""A request/reply channel between two local processes over a Unix domain socket.

The ClientApp that Flower starts for every message hands its work to a long-lived
edgetune worker (`edgetune.flower.worker`) on the same device through this channel. One
connection carries one request and its reply, each a frame:

    magic "ETC1" (4 bytes, the version in its last byte)
    u32 little-endian: length of the JSON envelope
    JSON envelope {"header": {...}, "blobs": [n0, n1, ...]}
    the blobs' raw bytes, n0 then n1 ...

Bytes (payloads, state) travel raw after the JSON, never inside it and never pickled.
Standard library only, so a process can use it without importing torch or Flower.

Every size is bounded before anything is allocated for it (`MAX_HEADER_BYTES`, at most
`MAX_BLOBS` blobs of `max_bytes` in all), and blob bytes are read as they arrive, so a
forged envelope that declares gigabytes costs nothing until the bytes exist. Anything
malformed (wrong magic, a header that is not JSON or not an object, negative sizes, a
peer that closes or stalls mid-frame) raises `ChannelError` and nothing else.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

from edgetune.errors import EdgetuneError

MAGIC = b"ETC1"
MAX_HEADER_BYTES = 4 * 1024**2  # a run's resolved config is a few KB
MAX_BLOBS = 16
MAX_BYTES = 4 * 1024**3  # all blobs of one frame: a full SmolLM2-135M state is 540 MB
CHUNK = 4 * 1024**2
SOCKET_PATH_MAX = 104  # sun_path is 108 bytes on Linux, 104 on macOS (with the NUL)


class ChannelError(EdgetuneError):
    """A frame could not be sent or read: malformed, too large, cut off, or timed out."""


def write_frame(
    sock: socket.socket, header: dict[str, Any], blobs: list[bytes], deadline: float | None = None
) -> None:
    """Send one frame: `header` (JSON-serializable) and `blobs` (raw bytes).

    Raises:
        ChannelError: the header cannot be serialized, the frame exceeds the bounds, or the
            peer is gone or too slow (past `deadline`, a `time.monotonic()` value).
    """
    if len(blobs) > MAX_BLOBS or sum(len(b) for b in blobs) > MAX_BYTES:
        raise ChannelError(f"frame too large: {len(blobs)} blobs of {MAX_BYTES} bytes at most")
    try:
        envelope = json.dumps({"header": header, "blobs": [len(b) for b in blobs]}).encode()
    except (TypeError, ValueError) as err:
        raise ChannelError(f"frame header is not JSON-serializable: {err}") from err
    if len(envelope) > MAX_HEADER_BYTES:
        raise ChannelError(f"frame header of {len(envelope)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        _timeout(sock, deadline)
        sock.sendall(MAGIC + struct.pack("<I", len(envelope)) + envelope)
        for blob in filter(None, blobs):  # an empty send could find the peer already done
            _timeout(sock, deadline)
            sock.sendall(blob)
    except TimeoutError as err:
        raise ChannelError("timed out sending a frame") from err
    except OSError as err:
        raise ChannelError(f"the peer went away while a frame was sent ({err})") from err


def read_frame(
    sock: socket.socket, deadline: float | None = None, max_bytes: int = MAX_BYTES
) -> tuple[dict[str, Any], list[bytes]]:
    """Receive one frame: (header, blobs).

    Args:
        sock: a connected stream socket.
        deadline: `time.monotonic()` by which the whole frame must have arrived.
        max_bytes: the most blob bytes this frame may declare.

    Raises:
        ChannelError: the frame is malformed, exceeds the bounds, is cut off, or does not
            arrive by `deadline`.
    """
    prefix = _recv_exact(sock, 8, deadline)
    if prefix[:4] != MAGIC:
        raise ChannelError(f"not an edgetune channel frame (magic {prefix[:4]!r}, not {MAGIC!r})")
    size = struct.unpack("<I", prefix[4:])[0]
    if size > MAX_HEADER_BYTES:
        raise ChannelError(f"frame header of {size} bytes exceeds {MAX_HEADER_BYTES}")
    header, sizes = parse_envelope(_recv_exact(sock, size, deadline), max_bytes)
    return header, [_recv_exact(sock, n, deadline) for n in sizes]


def parse_envelope(data: bytes, max_bytes: int = MAX_BYTES) -> tuple[dict[str, Any], list[int]]:
    """(header, blob sizes) from a frame's JSON envelope, validated.

    Raises:
        ChannelError: not UTF-8 JSON, not {"header": object, "blobs": [sizes]}, or sizes
            that are negative, not integers, too many or too large in all.
    """
    try:
        envelope = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ChannelError(f"frame header is not JSON: {str(err)[:80]}") from err
    if not isinstance(envelope, dict) or set(envelope) != {"header", "blobs"}:
        raise ChannelError('frame header is not an object {"header": ..., "blobs": [...]}')
    header, sizes = envelope["header"], envelope["blobs"]
    if not isinstance(header, dict) or not isinstance(sizes, list):
        raise ChannelError("frame header: 'header' must be an object and 'blobs' a list")
    if len(sizes) > MAX_BLOBS:
        raise ChannelError(f"frame declares {len(sizes)} blobs, more than {MAX_BLOBS}")
    if not all(type(n) is int and n >= 0 for n in sizes):
        raise ChannelError("frame blob sizes must be non-negative integers")
    if sum(sizes) > max_bytes:
        raise ChannelError(f"frame declares {sum(sizes)} blob bytes, more than {max_bytes}")
    return header, sizes


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    """Exactly n bytes from `sock`, read as they arrive (nothing preallocated)."""
    chunks, left = [], n
    try:
        while left:
            _timeout(sock, deadline)
            chunk = sock.recv(min(left, CHUNK))
            if not chunk:
                raise ChannelError(
                    f"the peer closed the connection mid-frame ({n - left} of {n} bytes read)"
                )
            chunks.append(chunk)
            left -= len(chunk)
    except TimeoutError as err:
        raise ChannelError(f"timed out waiting for a frame ({n - left} of {n} bytes read)") from err
    except OSError as err:
        raise ChannelError(f"the peer went away mid-frame ({err})") from err
    return b"".join(chunks)


def _timeout(sock: socket.socket, deadline: float | None) -> None:
    """Let the next socket operation wait until `deadline` at most."""
    if deadline is None:
        sock.settimeout(None)
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    sock.settimeout(left)


def request(
    path: str | Path, header: dict[str, Any], blobs: list[bytes], timeout: float
) -> tuple[dict[str, Any], list[bytes]]:
    """Send one request frame to the server listening at `path` and return its reply.

    Args:
        path: the server's Unix socket.
        header: the request header (JSON-serializable).
        blobs: raw bytes sent after the header.
        timeout: seconds for the whole exchange (connect, send, wait, receive).

    Raises:
        ChannelError: nothing listens at `path`, or the exchange failed (see `read_frame`).
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, TimeoutError) as err:
            raise ChannelError(f"nothing listens on {path} ({err.__class__.__name__})") from err
        except OSError as err:
            raise ChannelError(f"cannot connect to {path}: {err}") from err
        write_frame(sock, header, blobs, deadline)
        return read_frame(sock, deadline)


def listen(path: str | Path) -> socket.socket:
    """A Unix socket listening at `path`, readable and writable by this user only.

    A stale socket file (left by a process that was killed) is replaced; any other file
    at `path` is refused.

    Raises:
        ChannelError: the path is too long for a Unix socket, or is taken by a file that
            is not a socket.
    """
    path = Path(path)
    if len(os.fsencode(path)) >= SOCKET_PATH_MAX:
        raise ChannelError(
            f"socket path {path} is {len(os.fsencode(path))} bytes; Unix sockets allow fewer "
            f"than {SOCKET_PATH_MAX}: choose a shorter path"
        )
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise ChannelError(f"{path} exists and is not a socket: remove it or pick another")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket exists with mode 0600 from the start
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    server.listen(8)
    return server
