"""The divergence guard and train.keep on real stories260K runs: rollbacks that lower the
step size, resume across a rollback, the best adapter kept bit for bit, bad settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgetune.runs import RunDir
from edgetune.train.checkpoint import checkpoint_dir, list_checkpoints
from edgetune.train.guard import better

# Seed 3's loss first exceeds 1.05x its first loss at step 8 (see test_resume.py): a
# controlled trigger for the guard, which rolls back instead of stopping.
ROLLING = ("--seed", "3", "--lr", "1e-3", "train.checkpoint_every=1", "train.explode_factor=1.05")
# a 3-step average, so good points (new bests of the average) exist before step 8
ROLLING = (*ROLLING, "train.guard_window=3")


def _rows(run: Path) -> list[dict]:
    return RunDir(run, resume=True).read_metrics()


def _adapter(run: Path) -> bytes:
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


def test_the_guard_rolls_back_lowers_the_step_size_and_finishes(tmp_path, tiny_args, cli, capsys):
    # Execute
    run = tmp_path / "run"
    assert cli(tiny_args(run, *ROLLING, "train.keep_checkpoints=20", steps=12)) == 0
    # Assert: a rollback line naming the good step, half the step size afterwards
    rows = _rows(run)
    rollbacks = [r for r in rows if "rollback" in r]
    assert rollbacks, "the run was made to trip the guard"
    first = rollbacks[0]
    assert first["step"] == 8 and first["rollback"]["lr_scale"] == 0.5
    good = first["rollback"]["to_step"]
    assert 0 < good < 8
    lrs = {r["step"]: r["lr"] for r in rows if "loss" in r}
    assert lrs[8] == 1e-3 and lrs[9] == 5e-4
    assert "rolled back to step" in capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["rollbacks"] == len(rollbacks)
    # the restored parameters are the good step's checkpoint, bit for bit: step 9's loss
    # is measured on them, and the checkpoint of the good step holds the same tensors
    kept = torch.load(checkpoint_dir(run, 8) / "kept.pt", weights_only=True)
    assert kept["good"]["step"] == good
    at_good = load_file(checkpoint_dir(run, good) / "adapter.safetensors")
    assert all(torch.equal(kept["good"]["adapter"][k], at_good[k]) for k in at_good)


@pytest.mark.parametrize("restart", ["before", "after"])
def test_a_run_resumed_across_a_rollback_ends_as_the_uninterrupted_one(
    tmp_path, tiny_args, cli, restart
):
    # Prepare: the uninterrupted run, and a copy cut back to a checkpoint before (or
    # after) its first rollback at step 8, as if it had been killed there
    straight = tmp_path / "straight"
    assert cli(tiny_args(straight, *ROLLING, "train.keep_checkpoints=20", steps=12)) == 0
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    last = 7 if restart == "before" else 9
    for path in list_checkpoints(cut):
        if int(path.name.removeprefix("step-")) > last:
            shutil.rmtree(path)
    # Execute
    assert cli(["finetune", "--resume", str(cut)]) == 0
    # Assert
    assert _adapter(cut) == _adapter(straight)
    assert (cut / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()


def test_the_guard_stops_as_diverged_when_its_rollbacks_are_spent(tmp_path, tiny_args, cli, capsys):
    run = tmp_path / "boom"
    # a guard that fires on any batch loss above the best one so far
    hair_trigger = ("train.guard_window=1", "train.guard_margin=0.01", "train.guard_rollbacks=2")
    assert cli(tiny_args(run, *hair_trigger, steps=12)) == 2
    err = capsys.readouterr().err
    assert "after 2 rollbacks" in err and "--resume" in err
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"
    assert len([r for r in _rows(run) if "rollback" in r]) == 2


def test_keep_best_saves_the_best_evaluations_adapter_bit_for_bit(tmp_path, tiny_args, cli):
    # Prepare/Execute: evaluations and checkpoints at every step, every checkpoint kept
    run = tmp_path / "run"
    extra = ("--lr", "2e-2", "train.eval_every=1", "train.keep_checkpoints=20", "--seed", "1")
    assert cli(tiny_args(run, *extra, "train.checkpoint_every=1", steps=8)) == 0
    # Assert: the saved adapter is the checkpoint of the step the summary names
    summary = json.loads((run / "summary.json").read_text())
    step = summary["kept"]["step"]
    evals = {r["step"]: r for r in _rows(run) if "eval/accuracy" in r}
    assert summary["eval/accuracy"] == evals[step]["eval/accuracy"]
    assert summary["last_eval"]["eval/accuracy"] == evals[8]["eval/accuracy"]
    assert all(not better(e, evals[step]) for e in evals.values())
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    if step == 0:
        assert all(not t.any() for k, t in saved.items() if "lora_B" in k)
    else:
        at_step = load_file(checkpoint_dir(run, step) / "adapter.safetensors")
        mapped = {k.replace(".default", ""): v for k, v in at_step.items()}
        assert saved.keys() == mapped.keys()
        assert all(torch.equal(saved[k], mapped[k]) for k in saved)


def test_keep_best_without_held_out_rows_is_refused(tmp_path, tiny_args, cli, capsys):
    run = tmp_path / "run"
    assert cli(tiny_args(run, "train.keep=best", "data.eval_size=0")) == 2
    assert "train.keep=best needs held-out rows" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.guard_backoff=1.5", "train.guard_backoff"),
        ("train.guard_window=0", "train.guard_window"),
        ("train.keep=first", "train.keep"),
    ],
)
def test_bad_guard_settings_exit_2_naming_them(tmp_path, tiny_args, cli, capsys, setting, message):
    assert cli(tiny_args(tmp_path / "run", setting)) == 2
    assert message in capsys.readouterr().err


def test_guard_tuning_with_the_guard_off_is_refused(tmp_path, tiny_args, cli, capsys):
    run = tmp_path / "run"
    assert cli(tiny_args(run, "train.guard=false", "train.guard_window=5")) == 2
    assert "not read with train.guard=false" in capsys.readouterr().err


@pytest.mark.parametrize("keep", ["best", "last"])
def test_a_run_that_ends_below_its_start_warns_and_says_so_in_its_summary(
    tmp_path, tiny_args, cli, capsys, keep
):
    # Prepare: seed 1 at lr 2e-2 without the guard goes 0.4375 -> 0.4375 -> 0.375
    run = tmp_path / "run"
    extra = ("--lr", "2e-2", "--seed", "1", "train.guard=false", "train.eval_every=4")
    # Execute
    assert cli(tiny_args(run, *extra, f"train.keep={keep}", steps=8)) == 0
    # Assert
    err = capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["last_eval"]["eval/accuracy"] < summary["initial_eval"]["eval/accuracy"]
    assert "is below the one before training" in err and "--lr" in err
    assert summary["warnings"] and "is below the one before training" in summary["warnings"][0]
    if keep == "best":  # the kept adapter is no worse than the start
        assert summary["eval/accuracy"] >= summary["initial_eval"]["eval/accuracy"]
        assert summary["kept"]["step"] < 8
    else:
        assert summary["eval/accuracy"] == summary["last_eval"]["eval/accuracy"]


def test_a_rollback_on_the_last_step_scores_the_restored_adapter(tmp_path, tiny_args, cli):
    # Prepare: a hair-trigger guard with rollbacks to spare fires on the last step
    run = tmp_path / "run"
    extra = ("train.guard_window=1", "train.guard_margin=0.01", "train.guard_rollbacks=20")
    # Execute
    assert cli(tiny_args(run, *extra, "train.keep=last", steps=5)) == 0
    # Assert: after the last rollback comes an evaluation of what was restored (step 0's
    # adapter here, so it scores as the zero-shot one), and the summary reports it
    rows = _rows(run)
    assert "rollback" in rows[-2] and rows[-2]["step"] == 5
    assert rows[-2]["rollback"]["to_step"] == 0
    last = rows[-1]
    assert last["step"] == 5 and last["eval/loss"] == rows[0]["eval/loss"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval/loss"] == last["eval/loss"]
