"""Checkpoints for `--resume`: adapter tensors, optimizer state and loop state.

    DIR/checkpoints/step-NNNNNN/adapter.safetensors   Adapter.state_dict()
    DIR/checkpoints/step-NNNNNN/optimizer.pt           stepper state (loaded weights_only)
    DIR/checkpoints/step-NNNNNN/kept.pt                snapshots the loop keeps (optional):
                                                       the guard's rollback target, the best
                                                       evaluation's adapter
    DIR/checkpoints/step-NNNNNN/state.json             {"step": N, ...loop state, "sha256"}

A checkpoint is written to `step-NNNNNN.tmp` and renamed into place, so a run killed while
saving never leaves a half checkpoint that looks complete; an existing folder of the same
step is renamed aside first and removed only once the new one is in place, and older
checkpoints are pruned only after that. state.json, written last, holds the SHA-256 of the
other two files: loading checks them, so a truncated or overwritten file is caught before
it is used and `--resume` falls back to the newest intact checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgetune.console import warn  # also imported from here by train/ and fed/
from edgetune.errors import ConfigError, EdgetuneError

HASHED_FILES = ("adapter.safetensors", "optimizer.pt")
KEPT_FILE = "kept.pt"


class CheckpointError(EdgetuneError):
    """A checkpoint (or federated round state) is missing, truncated or corrupt."""


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the complete folder `tmp` to `target`. An existing `target` is renamed aside
    and removed only after the new one is in place, so no instant lacks both."""
    aside = target.with_name(target.name + ".old")
    shutil.rmtree(aside, ignore_errors=True)
    if target.exists():
        target.rename(aside)
    tmp.rename(target)
    shutil.rmtree(aside, ignore_errors=True)


def save_checkpoint(
    run: Path,
    step: int,
    adapter_state: dict[str, torch.Tensor],
    stepper_state: dict[str, Any],
    loop_state: dict[str, Any],
    keep: int,
    kept: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint for `step` and keep only the `keep` most recent; `kept` (the
    loop's snapshots, tensors and plain values) goes to kept.pt."""
    target = checkpoint_dir(run, step)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in adapter_state.items()}, tmp / "adapter.safetensors")
    torch.save(stepper_state, tmp / "optimizer.pt")
    names = HASHED_FILES
    if kept is not None:
        torch.save(kept, tmp / KEPT_FILE)
        names = (*names, KEPT_FILE)
    digests = {name: sha256(tmp / name) for name in names}
    (tmp / "state.json").write_text(json.dumps({"step": step, **loop_state, "sha256": digests}))
    swap_into_place(tmp, target)
    for old in list_checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(run: Path) -> list[Path]:
    """Checkpoint folders that were renamed into place (complete or since damaged), oldest
    first; `.tmp` / `.old` folders of an interrupted save are not among them."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and "." not in p.name)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(adapter state, stepper state, loop state) of a checkpoint folder, verified; the
    loop state holds kept.pt's snapshots under "kept" when the checkpoint has them.

    Raises:
        CheckpointError: a file is missing, fails its checksum or does not parse.
    """
    loop = _read_state(path)
    for name, expected in loop.pop("sha256", {}).items():
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is missing")
        if sha256(path / name) != expected:
            raise CheckpointError(f"{path / name} does not match its checksum (truncated?)")
    try:
        adapter = load_file(path / "adapter.safetensors")
        stepper = torch.load(path / "optimizer.pt", weights_only=True)
        if (path / KEPT_FILE).is_file():
            loop["kept"] = torch.load(path / KEPT_FILE, weights_only=True)
    except (OSError, SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path} does not load: {type(exc).__name__}: {exc}") from None
    return adapter, stepper, loop


def _read_state(path: Path) -> dict[str, Any]:
    """state.json of a checkpoint, checked to name the step of its folder."""
    try:
        loop = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'state.json'} is unreadable: {exc}") from None
    step = loop.get("step") if isinstance(loop, dict) else None
    if not isinstance(step, int) or path.name.split(".")[0] != f"step-{step:06d}":
        raise CheckpointError(f"{path / 'state.json'} does not name the step of {path.name}")
    return loop


def check_saved_rank(
    tensors: dict[str, torch.Tensor], peft: Any, saved: Path, config: Path
) -> None:
    """Refuse to resume LoRA tensors of one rank into an adapter of another: config.yaml's
    peft.rank was edited after `saved` (a checkpoint or round state) was written. Checked
    before anything is loaded or written (copying them in fails with a tensor size error).

    Raises:
        ConfigError: naming config.yaml, both ranks and the fix.
    """
    if peft.method not in ("lora", "lora-fa"):
        return
    held = sorted({t.shape[0] for k, t in tensors.items() if ".lora_A." in k and t.dim() == 2})
    if held and held != [peft.rank]:
        shown = ", ".join(map(str, held))
        raise ConfigError(
            f"{config} says peft.rank={peft.rank}, but {saved} holds LoRA tensors of rank "
            f"{shown}: config.yaml was edited after the run started. Put back peft.rank="
            f"{shown} in {config} to resume, or start a new run with --config {config} "
            "--out NEW_DIR"
        )


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder, from its name (step-NNNNNN[.old])."""
    return int(path.name.split(".")[0].removeprefix("step-"))


def good_before_divergence(run: Path, diverged_at: int) -> list[Path]:
    """Checkpoints taken before a loss diverged at step `diverged_at`. The loss of step s
    is measured on the parameters after s - 1 updates, so checkpoint s - 1 already holds
    the parameters that diverged: only steps up to s - 2 are good."""
    return [p for p in list_checkpoints(run) if checkpoint_step(p) <= diverged_at - 2]


def newest_intact(
    run: Path, up_to: int | None = None
) -> tuple[tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]] | None, list[Path]]:
    """The newest checkpoint that verifies (of steps <= `up_to` when given), and the broken
    ones newer than it.

    Returns:
        ((adapter state, stepper state, loop state) or None when none verifies, the broken
        checkpoint folders, newest first). Each broken one is reported on stderr.
    """
    # A save killed between renaming an existing folder of its step aside and renaming
    # the new one into place leaves only `step-N.old`: it is still that step's checkpoint.
    aside = [p for p in (run / "checkpoints").glob("step-*.old") if not p.with_suffix("").exists()]
    found = [*list_checkpoints(run), *aside]
    found = [p for p in found if up_to is None or checkpoint_step(p) <= up_to]
    broken: list[Path] = []
    for path in sorted(found, key=lambda p: p.name, reverse=True):
        try:
            return load_checkpoint(path), broken
        except CheckpointError as exc:
            warn(f"checkpoint {path.name} is broken ({exc}); trying an older one")
            broken.append(path)
    return None, broken
