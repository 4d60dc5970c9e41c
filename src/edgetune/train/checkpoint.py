"""Checkpoints for `--resume`: adapter tensors, optimizer state and loop state.

    DIR/checkpoints/step-NNNNNN/adapter.safetensors   Adapter.state_dict()
    DIR/checkpoints/step-NNNNNN/optimizer.pt           stepper state (loaded weights_only)
    DIR/checkpoints/step-NNNNNN/state.json             {"step": N, ...loop state}

A checkpoint is written to a temporary folder and renamed, so a run killed while saving
never leaves a half checkpoint that looks complete; older ones are pruned after.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(
    run: Path,
    step: int,
    adapter_state: dict[str, torch.Tensor],
    stepper_state: dict[str, Any],
    loop_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write the checkpoint for `step` and keep only the `keep` most recent."""
    target = checkpoint_dir(run, step)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in adapter_state.items()}, tmp / "adapter.safetensors")
    torch.save(stepper_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **loop_state}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for old in list_checkpoints(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / "state.json").exists() and "." not in p.name]
    return sorted(done)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(adapter state, stepper state, loop state) of a checkpoint folder."""
    adapter = load_file(path / "adapter.safetensors")
    stepper = torch.load(path / "optimizer.pt", weights_only=True)
    loop = json.loads((path / "state.json").read_text())
    return adapter, stepper, loop
