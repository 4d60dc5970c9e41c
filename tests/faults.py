"""Fault classes for the fault-injection tier (`tests/test_faults.py`).

A fault damages one file edgetune reads, or makes one path it writes unwritable, the way a
user's machine does: a copy cut short, bytes flipped by a bad disk or a text editor, a file
deleted, a field edited by hand, an `--out` that cannot be a folder. Each fault is a function
of the path; the harness applies it to a fresh copy of a good input, so every case starts
from a working command and differs by exactly one fault.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

Fault = Callable[[Path], None]


def truncated(path: Path) -> None:
    """Cut the file to half its bytes (an interrupted copy or download)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt(path: Path) -> None:
    """Overwrite 32 bytes near the start with 0xff (what a bad sector or a binary editor
    leaves): a safetensors header, a JSON / YAML / CSV text stops parsing or decoding."""
    data = bytearray(path.read_bytes())
    start = min(8, max(len(data) - 32, 0))
    data[start : start + 32] = b"\xff" * 32
    path.write_bytes(bytes(data))


def empty(path: Path) -> None:
    """The file exists and holds nothing (a disk that filled up before the first write)."""
    path.write_bytes(b"")


def missing(path: Path) -> None:
    """The file is gone (deleted, or never copied)."""
    path.unlink()


def edit_json(change: Callable[[Any], Any]) -> Fault:
    """A fault that edits a JSON file by hand: `change(data)` returns the new content."""

    def fault(path: Path) -> None:
        data = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(change(data), indent=2), encoding="utf-8")

    return fault


def edit_yaml(change: Callable[[Any], Any]) -> Fault:
    """A fault that edits a YAML file by hand: `change(data)` returns the new content."""

    def fault(path: Path) -> None:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        path.write_text(yaml.safe_dump(change(data), sort_keys=False), encoding="utf-8")

    return fault


def edit_safetensors(change: Callable[[dict], dict]) -> Fault:
    """A fault that rewrites a safetensors file with `change(tensors)` (a wrong shape)."""

    def fault(path: Path) -> None:
        from safetensors.torch import load_file, save_file

        save_file(change(load_file(path)), path)

    return fault


FILE_FAULTS: dict[str, Fault] = {
    "truncated": truncated,
    "corrupt": corrupt,
    "empty": empty,
    "missing": missing,
}


# --- paths an --out cannot be -----------------------------------------------------------


def under_a_file(root: Path) -> Path:
    """An --out inside a regular file (root ignores permissions, not file types)."""
    (root / "a-file").write_text("not a folder\n")
    return root / "a-file" / "out"


def symlink_loop(root: Path) -> Path:
    """An --out that is a symbolic link pointing to itself."""
    link = root / "loop"
    os.symlink(link, link)
    return link


def special_filesystem(root: Path) -> Path:
    """An --out on /proc, where no folder can be created."""
    del root
    return Path(f"/proc/edgetune-fault-{os.getpid()}")


OUT_FAULTS: dict[str, Callable[[Path], Path]] = {
    "under-a-file": under_a_file,
    "symlink-loop": symlink_loop,
    "special-fs": special_filesystem,
}


# --- nothing lost ------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (links not followed) -> SHA-256 of its bytes."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def lost(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Files of `before` that are gone or changed in `after` (new files are allowed)."""
    return [name for name, digest in before.items() if after.get(name) != digest]
