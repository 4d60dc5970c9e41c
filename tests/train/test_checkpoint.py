"""Single-device checkpoints: verified on load, the newest intact one wins, and a save
killed at any point leaves a complete checkpoint behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import edgetune.train.checkpoint as ckpt
from edgetune.train.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    load_checkpoint,
    newest_intact,
    save_checkpoint,
)


def _save(run: Path, step: int, value: float) -> None:
    adapter = {"lora_B": torch.full((4, 2), value), "lora_A": torch.arange(8.0).view(2, 4)}
    stepper = {"optimizer": {"state": {0: {"exp_avg": torch.full((3,), value)}}}}
    save_checkpoint(run, step, adapter, stepper, {"first_loss": 2.5, "train_s": 1.0}, keep=3)


def _value(checkpoint: tuple) -> float:
    return float(checkpoint[0]["lora_B"][0, 0])


def test_a_checkpoint_round_trips_and_records_checksums(tmp_path):
    _save(tmp_path, 2, 0.5)
    adapter, stepper, loop = load_checkpoint(checkpoint_dir(tmp_path, 2))
    assert torch.equal(adapter["lora_B"], torch.full((4, 2), 0.5))
    assert torch.equal(stepper["optimizer"]["state"][0]["exp_avg"], torch.full((3,), 0.5))
    assert loop == {"step": 2, "first_loss": 2.5, "train_s": 1.0}
    state = json.loads((checkpoint_dir(tmp_path, 2) / "state.json").read_text())
    assert set(state["sha256"]) == {"adapter.safetensors", "optimizer.pt"}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated adapter": lambda d: _truncate(d / "adapter.safetensors"),
    "empty optimizer": lambda d: (d / "optimizer.pt").write_bytes(b""),
    "bad state.json": lambda d: (d / "state.json").write_text('{"step": 4,'),
    "missing state.json": lambda d: (d / "state.json").unlink(),
    "state.json of another step": lambda d: (d / "state.json").write_text('{"step": 2}'),
    "missing adapter": lambda d: (d / "adapter.safetensors").unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path, capsys, damage):
    # Prepare
    _save(tmp_path, 2, 1.0)
    _save(tmp_path, 4, 2.0)
    DAMAGE[damage](checkpoint_dir(tmp_path, 4))
    # Execute
    found, broken = newest_intact(tmp_path)
    # Assert
    assert found is not None and found[2]["step"] == 2 and _value(found) == 1.0
    assert broken == [checkpoint_dir(tmp_path, 4)]
    assert "step-000004 is broken" in capsys.readouterr().err


def test_a_checkpoint_without_checksums_is_still_checked_by_parsing(tmp_path):
    # checkpoints written before checksums existed hold no "sha256" in state.json
    _save(tmp_path, 2, 1.0)
    folder = checkpoint_dir(tmp_path, 2)
    (folder / "state.json").write_text(json.dumps({"step": 2}))
    assert load_checkpoint(folder)[2] == {"step": 2}
    _truncate(folder / "adapter.safetensors")
    with pytest.raises(CheckpointError, match="does not load"):
        load_checkpoint(folder)


def test_with_no_intact_checkpoint_nothing_is_returned(tmp_path):
    _save(tmp_path, 2, 1.0)
    (checkpoint_dir(tmp_path, 2) / "optimizer.pt").write_bytes(b"")
    found, broken = newest_intact(tmp_path)
    assert found is None and broken == [checkpoint_dir(tmp_path, 2)]


class _Killed(Exception):
    pass


def _kill_at(k: int, monkeypatch: pytest.MonkeyPatch, fn) -> bool:
    """Call `fn` with its k-th file operation (0-based) raising before it runs, as a kill
    would leave the disk; True when it was killed."""
    ops = [
        (shutil, "rmtree"),
        (Path, "rename"),
        (Path, "mkdir"),
        (Path, "write_text"),
        (Path, "unlink"),
        (ckpt, "save_file"),
        (torch, "save"),
    ]
    count = [0]

    def killing(real):
        def op(*args, **kwargs):
            if count[0] == k:
                raise _Killed
            count[0] += 1
            return real(*args, **kwargs)

        return op

    with monkeypatch.context() as m:
        for owner, name in ops:
            m.setattr(owner, name, killing(getattr(owner, name)))
        try:
            fn()
        except _Killed:
            return True
    return False


def test_a_save_killed_at_any_point_keeps_a_complete_checkpoint_of_that_step(tmp_path, monkeypatch):
    # Re-saving an existing step used to delete it before renaming the new one in place;
    # a kill in that gap lost the step.
    k = 0
    while True:
        run = tmp_path / f"kill-{k}"
        _save(run, 2, 1.0)
        _save(run, 4, 2.0)
        killed = _kill_at(k, monkeypatch, lambda run=run: _save(run, 4, 3.0))
        found, broken = newest_intact(run)
        assert broken == [], f"kill at operation {k}"
        assert found is not None and found[2]["step"] == 4, f"kill at operation {k}"
        assert _value(found) in (2.0, 3.0)
        if not killed:
            assert _value(found) == 3.0
            break
        k += 1
    assert k >= 6  # every gap of the save was tried
