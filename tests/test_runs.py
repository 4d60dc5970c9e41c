"""The run directory contract: refuses to clobber, resumable, NaN-safe JSON lines."""

from __future__ import annotations

import json

import pytest

from edgetune.errors import EdgetuneError
from edgetune.runs import RunDir


def test_log_truncate_and_summary(tmp_path):
    run = RunDir(tmp_path / "r")
    run.write_config({"seed": 1})
    for step in range(4):
        run.log({"step": step, "loss": 1.0 / (step + 1)})
    run.log({"step": 3, "loss": float("nan")})
    run.truncate_after(2)
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 2]
    run.write_summary({"wall_s": 1.5, "peak_rss_mb": float("inf")})
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary == {"wall_s": 1.5, "peak_rss_mb": "inf"}


def test_existing_run_is_never_silently_overwritten(tmp_path):
    run = RunDir(tmp_path / "r")
    run.write_config({})
    run.log({"step": 1, "loss": 2.0})
    with pytest.raises(EdgetuneError, match="already holds a run.*--resume"):
        RunDir(tmp_path / "r")
    (tmp_path / "r" / "clients.jsonl").write_text("{}\n")
    (tmp_path / "r" / "checkpoints" / "step-000001").mkdir(parents=True)
    RunDir(tmp_path / "r", overwrite=True)
    for name in ("metrics.jsonl", "clients.jsonl", "checkpoints", "config.yaml"):
        assert not (tmp_path / "r" / name).exists(), name


def test_resume_of_a_missing_run_says_so(tmp_path):
    with pytest.raises(EdgetuneError, match="cannot resume"):
        RunDir(tmp_path / "nothing", resume=True)
