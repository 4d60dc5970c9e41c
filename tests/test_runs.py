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


def test_peak_rss_keeps_the_peak_from_before_a_reset():
    import mmap

    from edgetune.runs import peak_rss_mb, reset_peak_rss, status_mb

    # An anonymous mapping, not an allocator's block: the allocator may reuse resident
    # memory or keep it after a free, the kernel unmaps this one on close.
    size = 64 * 2**20
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1  # touch every page: resident
    with_block = status_mb("VmRSS")
    block.close()
    if not reset_peak_rss():
        pytest.skip("this kernel does not allow resetting the peak mark")
    assert status_mb("VmHWM") < with_block - 32  # the kernel's mark forgot the block
    assert peak_rss_mb() >= with_block  # the process's peak did not
