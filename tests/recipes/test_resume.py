"""`edgetune finetune --resume` on real stories260K runs: it continues in the folder it is
given, applies the settings that may change and refuses the rest before writing anything,
falls back past a damaged checkpoint, and never restarts silently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from edgetune.runs import RunDir


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _adapter(run: Path) -> bytes:
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


def test_resuming_a_copied_run_continues_in_the_copy(tmp_path, tiny_args, cli):
    # Prepare: a finished run and a copy of it
    original = tmp_path / "original"
    assert cli(tiny_args(original)) == 0
    before = _snapshot(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    # Execute: resume the copy, two steps further
    assert cli(["finetune", "--resume", str(copy), "--steps", "6"]) == 0
    # Assert: the original is untouched; the copy trained on and knows where it lives
    assert _snapshot(original) == before
    assert yaml.safe_load((copy / "config.yaml").read_text())["out"] == str(copy)
    assert json.loads((copy / "summary.json").read_text())["steps"] == 6


@pytest.mark.parametrize("method", ["zo", "fo"])
def test_resuming_with_more_steps_equals_a_longer_uninterrupted_run(
    tmp_path, tiny_args, cli, method
):
    # Prepare
    assert cli(tiny_args(tmp_path / "straight", method=method, steps=6)) == 0
    assert cli(tiny_args(tmp_path / "short", method=method, steps=4)) == 0
    # Execute
    assert cli(["finetune", "--resume", str(tmp_path / "short"), "--steps", "6"]) == 0
    # Assert: same adapter bit for bit, same metrics file byte for byte
    assert _adapter(tmp_path / "short") == _adapter(tmp_path / "straight")
    assert (tmp_path / "short" / "metrics.jsonl").read_bytes() == (
        tmp_path / "straight" / "metrics.jsonl"
    ).read_bytes()


def test_a_new_learning_rate_on_resume_applies_from_the_restored_step(tmp_path, tiny_args, cli):
    # Prepare
    run = tmp_path / "run"
    assert cli(tiny_args(run, "--lr", "1e-3", steps=4)) == 0
    # Execute: the recovery the divergence error suggests, as a named flag and as key=value
    assert cli(["finetune", "--resume", str(run), "--steps", "6", "--lr", "5e-4"]) == 0
    assert cli(["finetune", "--resume", str(run), "train.steps=8", "zo.eps=0.01"]) == 0
    # Assert
    lrs = [r["lr"] for r in RunDir(run, resume=True).read_metrics() if "loss" in r]
    assert lrs == [1e-3] * 4 + [5e-4] * 4
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["optim"]["lr"] == 5e-4 and config["zo"]["eps"] == 0.01
    assert config["train"]["steps"] == 8
    resumes = RunDir(run, resume=True).read_metrics("resumes.jsonl")
    assert [r["step"] for r in resumes] == [4, 6]
    assert resumes[0]["changed"] == {"train.steps": [4, 6], "optim.lr": [1e-3, 5e-4]}
    assert resumes[1]["changed"] == {"train.steps": [6, 8], "zo.eps": [1e-3, 0.01]}


REFUSED = [
    (["seed=7"], "seed"),
    (["--seed", "7"], "seed"),
    (["peft.rank=4"], "peft.rank"),
    (["--method", "fo"], "train.method"),
    (["--batch-size", "2"], "train.batch_size"),
    (["data.max_length=16"], "data.max_length"),
    (["optim.schedule=cosine"], "optim.schedule"),
    (["--steps", "2"], "train.steps"),  # fewer than the 4 steps done
    (["--out", "elsewhere"], "--out"),
    (["--overwrite"], "--overwrite"),
    (["--config", "other.yaml"], "--config"),
    (["peft.rnak=4"], "peft.rnak"),
]


def test_settings_that_shaped_the_run_are_refused_and_nothing_is_written(
    tmp_path, tiny_args, cli, capsys
):
    # Prepare
    run = tmp_path / "run"
    assert cli(tiny_args(run)) == 0
    before = _snapshot(run)
    capsys.readouterr()
    for extra, key in REFUSED:
        # Execute
        status = cli(["finetune", "--resume", str(run), *extra])
        # Assert: exit 2, a message naming the key and the way out, the run untouched
        err = capsys.readouterr().err
        assert status == 2, extra
        assert key in err and "Traceback" not in err, (extra, err)
        assert _snapshot(run) == before, extra
    # and a plain resume still works afterwards
    assert cli(["finetune", "--resume", str(run)]) == 0


def test_a_damaged_config_yaml_is_a_clear_error(tmp_path, tiny_args, cli, capsys):
    run = tmp_path / "run"
    assert cli(tiny_args(run, steps=2)) == 0
    (run / "config.yaml").write_text("model: [unclosed\n")
    capsys.readouterr()
    assert cli(["finetune", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml is damaged" in err and "Traceback" not in err


def test_a_refused_setting_names_the_fix(tmp_path, tiny_args, cli, capsys):
    run = tmp_path / "run"
    assert cli(tiny_args(run)) == 0
    capsys.readouterr()
    assert cli(["finetune", "--resume", str(run), "peft.rank=4"]) == 2
    err = capsys.readouterr().err
    assert "peft.rank=4 cannot change on --resume" in err
    assert f"--config {run / 'config.yaml'} --out NEW_DIR peft.rank=4" in err


def test_more_steps_under_a_decaying_schedule_are_refused(tmp_path, tiny_args, cli, capsys):
    run = tmp_path / "run"
    assert cli(tiny_args(run, "optim.schedule=cosine")) == 0
    before = _snapshot(run)
    assert cli(["finetune", "--resume", str(run), "--steps", "6"]) == 2
    assert "optim.schedule=cosine" in capsys.readouterr().err
    assert _snapshot(run) == before


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated adapter": lambda d: _truncate(d / "adapter.safetensors"),
    "empty optimizer state": lambda d: (d / "optimizer.pt").write_bytes(b""),
    "bad state.json": lambda d: (d / "state.json").write_text("{not json"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(
    tmp_path, tiny_args, cli, capsys, damage
):
    # Prepare: a 6-step run with checkpoints at 2, 4 and 6, then the newest damaged
    run = tmp_path / "run"
    assert cli(tiny_args(run, "train.keep_checkpoints=3", steps=6)) == 0
    adapter, metrics = _adapter(run), (run / "metrics.jsonl").read_bytes()
    DAMAGE[damage](run / "checkpoints" / "step-000006")
    capsys.readouterr()
    # Execute
    assert cli(["finetune", "--resume", str(run)]) == 0
    # Assert: a visible warning, steps 5-6 retrained to the same result, logs not doubled
    err = capsys.readouterr().err
    assert "step-000006 is broken" in err and "from step 4" in err
    assert _adapter(run) == adapter
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert RunDir(run, resume=True).read_metrics("resumes.jsonl")[0]["dropped"] == ["step-000006"]


def test_with_every_checkpoint_damaged_resume_refuses(tmp_path, tiny_args, cli, capsys):
    run = tmp_path / "run"
    assert cli(tiny_args(run)) == 0
    for folder in (run / "checkpoints").iterdir():
        (folder / "optimizer.pt").write_bytes(b"")
    before = _snapshot(run)
    capsys.readouterr()
    assert cli(["finetune", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "every checkpoint is broken" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert _snapshot(run) == before


def test_a_run_whose_checkpoints_were_deleted_is_not_silently_restarted(
    tmp_path, tiny_args, cli, capsys
):
    # Prepare
    run = tmp_path / "run"
    assert cli(tiny_args(run)) == 0
    metrics = (run / "metrics.jsonl").read_bytes()
    shutil.rmtree(run / "checkpoints")
    capsys.readouterr()
    # Execute
    status = cli(["finetune", "--resume", str(run)])
    # Assert: refused, log untouched, and the command the message gives starts it over
    err = capsys.readouterr().err
    assert status == 2 and "trained 4 steps" in err and "checkpoints/ holds none" in err
    assert (run / "metrics.jsonl").read_bytes() == metrics
    fix = err[err.index("`edgetune ") + len("`edgetune ") : err.rindex("`")].split()
    assert cli(fix) == 0
    assert (run / "metrics.jsonl").read_bytes() == metrics


class _Killed(Exception):
    pass


def test_a_run_killed_before_its_first_checkpoint_restarts_without_duplicate_lines(
    tmp_path, tiny_args, cli, capsys, monkeypatch
):
    # Prepare: the reference, and a run killed after step 1 (its first checkpoint is due at 2)
    assert cli(tiny_args(tmp_path / "straight")) == 0
    original = RunDir.log

    def log_then_die(self, record, file="metrics.jsonl"):
        original(self, record, file)
        if record.get("step") == 1 and "loss" in record and file == "metrics.jsonl":
            raise _Killed

    monkeypatch.setattr(RunDir, "log", log_then_die)
    with pytest.raises(_Killed):
        cli(tiny_args(tmp_path / "killed"))
    monkeypatch.setattr(RunDir, "log", original)
    capsys.readouterr()
    # Execute
    assert cli(["finetune", "--resume", str(tmp_path / "killed")]) == 0
    # Assert: a warning, then the same run as the uninterrupted one (one step-0 line)
    assert "starts again from step 0" in capsys.readouterr().err
    assert (tmp_path / "killed" / "metrics.jsonl").read_bytes() == (
        tmp_path / "straight" / "metrics.jsonl"
    ).read_bytes()


def test_a_diverged_run_recovers_with_the_lower_lr_its_error_suggests(
    tmp_path, tiny_args, cli, capsys
):
    # Prepare: a run that diverges, keeping its last good checkpoint
    run = tmp_path / "boom"
    args = ("--lr", "1e6", "train.checkpoint_every=1", "train.guard=false")
    assert cli(tiny_args(run, *args, steps=6)) == 2
    assert "--resume" in capsys.readouterr().err
    # Execute: what the error says: lower optim.lr and resume
    assert cli(["finetune", "--resume", str(run), "--lr", "1e-3"]) == 0
    # Assert: finished, no "diverged" line left, the new lr on every step after the restart
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 6
    rows = [r for r in RunDir(run, resume=True).read_metrics() if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert not any(r.get("diverged") for r in rows)
    restarted = RunDir(run, resume=True).read_metrics("resumes.jsonl")[0]["step"]
    assert all(r["lr"] == 1e-3 for r in rows[restarted:])


def test_a_diverged_run_resumes_from_the_checkpoint_before_the_diverged_parameters(
    tmp_path, tiny_args, cli, capsys
):
    # Prepare: seed 3's loss first exceeds 1.05 x its first loss at step 8 (1.142 > 1.072),
    # so the checkpoint of step 7 holds the parameters whose loss diverged
    extra = ("--seed", "3", "--lr", "1e-3", "train.checkpoint_every=1", "train.guard=false")
    assert cli(tiny_args(tmp_path / "straight", *extra, steps=8)) == 0
    run = tmp_path / "run"
    assert cli(tiny_args(run, *extra, "train.explode_factor=1.05", steps=8)) == 2
    err = capsys.readouterr().err
    assert "at step 8" in err and "the last good checkpoint is" in err
    assert err.split("the last good checkpoint is ")[1].startswith(
        str(run / "checkpoints" / "step-000006")
    )
    # Execute
    assert cli(["finetune", "--resume", str(run), "train.explode_factor=20"]) == 0
    # Assert: step-000007 dropped with a warning, steps 7-8 redone as the uninterrupted run
    assert "step-000007" in capsys.readouterr().err
    resumes = RunDir(run, resume=True).read_metrics("resumes.jsonl")
    assert resumes[0]["step"] == 6 and resumes[0]["dropped"] == ["step-000007"]
    assert _adapter(run) == _adapter(tmp_path / "straight")
    assert (run / "metrics.jsonl").read_bytes() == (
        tmp_path / "straight" / "metrics.jsonl"
    ).read_bytes()


def test_a_torn_metrics_line_resumes_to_the_uninterrupted_run(
    tmp_path, tiny_args, cli, capsys, run_torn
):
    # Prepare: the reference, and a run killed half-way through writing step 5's line
    assert cli(tiny_args(tmp_path / "straight", "--threads", "1", steps=6)) == 0
    run = tmp_path / "torn"
    run_torn(tiny_args(run, "--threads", "1", steps=6), "metrics.jsonl", "step", 5)
    assert not (run / "metrics.jsonl").read_bytes().endswith(b"\n")
    capsys.readouterr()
    # Execute
    assert cli(["finetune", "--resume", str(run), "--threads", "1"]) == 0
    # Assert: the torn line reported and dropped; the result is the uninterrupted run's
    err = capsys.readouterr().err
    assert f"{run / 'metrics.jsonl'}: dropped its last line" in err
    assert _adapter(run) == _adapter(tmp_path / "straight")
    for name in ("metrics.jsonl", "trace.jsonl"):
        assert (run / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    (resume,) = RunDir(run, resume=True).read_metrics("resumes.jsonl")
    assert resume["wall_s_before"] > 0  # the killed call ran up to step 5
    assert {k: v for k, v in resume.items() if k != "wall_s_before"} == {
        "step": 4,
        "dropped": [],
        "changed": {},
    }


def test_a_resume_killed_while_rewriting_its_logs_loses_nothing(
    tmp_path, tiny_args, cli, monkeypatch
):
    # Prepare: a finished 4-step run, resumed to 6 but killed at its first log rewrite
    import edgetune.runs as runs

    assert cli(tiny_args(tmp_path / "straight", "--threads", "1", steps=6)) == 0
    run = tmp_path / "run"
    assert cli(tiny_args(run, "--threads", "1")) == 0
    metrics = (run / "metrics.jsonl").read_bytes()

    def die(src, dst):
        raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(runs.os, "replace", die)
        with pytest.raises(_Killed):
            cli(["finetune", "--resume", str(run), "--steps", "6", "--threads", "1"])
    # Assert: the log is whole; the next resume ends as the uninterrupted run
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert cli(["finetune", "--resume", str(run), "--steps", "6", "--threads", "1"]) == 0
    assert _adapter(run) == _adapter(tmp_path / "straight")
    assert (run / "metrics.jsonl").read_bytes() == (
        tmp_path / "straight" / "metrics.jsonl"
    ).read_bytes()


def test_a_damaged_line_before_the_last_is_a_clear_error(tmp_path, tiny_args, cli, capsys):
    # Prepare: a finished run whose metrics.jsonl was edited in the middle
    run = tmp_path / "run"
    assert cli(tiny_args(run, "--threads", "1")) == 0
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(b"".join([lines[0], b'{"step": 1, "lo\n', *lines[1:]]))
    before = _snapshot(run)
    capsys.readouterr()
    # Execute
    status = cli(["finetune", "--resume", str(run), "--steps", "6", "--threads", "1"])
    # Assert: exit 2 naming the file, the line and the fix; nothing written
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert f"{run / 'metrics.jsonl'} line 2 is damaged" in err and "Delete line 2" in err
    assert _snapshot(run) == before
