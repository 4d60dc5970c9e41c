"""The run directory contract: refuses to clobber, resumable, NaN-safe JSON lines."""

from __future__ import annotations

import json
from pathlib import Path

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


# --- the one reader of run-folder logs: torn last line, damaged middle line, empty -----


def _log_of(tmp_path, text: bytes):
    """A run folder whose metrics.jsonl holds `text`."""
    run = RunDir(tmp_path / "r")
    (run.path / "metrics.jsonl").write_bytes(text)
    return run


def test_trim_heap_gives_back_the_free_pages_between_live_buffers():
    import ctypes.util

    import torch

    from edgetune.runs import status_mb, trim_heap

    if ctypes.util.find_library("c") is None or not hasattr(
        ctypes.CDLL("libc.so.6"), "malloc_trim"
    ):
        pytest.skip("malloc_trim is glibc's")
    # 64 MB of 4 KB buffers (below the mmap threshold: heap), one in 16 kept alive, so
    # the freed ones are holes the heap's top cannot shrink past
    buffers = [torch.empty(1024) for _ in range(16384)]
    kept = buffers[::16]
    del buffers
    held = status_mb("VmRSS")
    assert trim_heap()
    assert held - status_mb("VmRSS") > 24  # most of the 60 MB freed goes back
    assert len(kept) == 1024


@pytest.mark.parametrize(
    "tail",
    [
        b'{"step": 3, "lo',
        b'{"step": 3, "loss": 0.5\n',
        b"\x00\x00\x00\x00",
        b'{"step": 3, "\xe2\x82',
    ],
    ids=["cut-mid-line", "cut-before-brace", "zero-filled", "cut-mid-character"],
)
def test_a_torn_last_line_is_dropped_with_a_warning_and_the_rest_kept(tmp_path, capsys, tail):
    # Prepare: two whole lines, then what a killed append leaves
    run = _log_of(tmp_path, b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n' + tail)
    # Execute
    rows = run.read_metrics()
    # Assert
    assert rows == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    err = capsys.readouterr().err
    assert f"{run.metrics_path}: dropped its last line (line 3" in err
    assert "interrupted write" in err


def test_a_torn_line_is_reported_once_however_often_the_file_is_read(tmp_path, capsys):
    run = _log_of(tmp_path, b'{"step": 1}\n{"st')
    assert run.read_metrics() == run.read_metrics() == [{"step": 1}]
    assert capsys.readouterr().err.count("dropped its last line") == 1


@pytest.mark.parametrize(
    "middle", [b'{"step": 2, "lo', b"[1, 2]", b"\xff\xfe"], ids=["torn", "a-list", "not-utf8"]
)
def test_a_damaged_line_before_the_last_is_refused_with_its_number(tmp_path, middle):
    from edgetune.runs import RunFileError

    run = _log_of(tmp_path, b'{"step": 1}\n' + middle + b'\n{"step": 3}\n')
    with pytest.raises(RunFileError, match=r"metrics.jsonl line 2 is damaged.*Delete line 2"):
        run.read_metrics()


def test_an_empty_or_blank_or_missing_log_reads_as_no_lines(tmp_path, capsys):
    run = _log_of(tmp_path, b"")
    (run.path / "timing.jsonl").write_bytes(b"\n  \n")
    assert run.read_metrics() == []
    assert run.read_metrics("timing.jsonl") == []
    assert run.read_metrics("clients.jsonl") == []
    assert capsys.readouterr().err == ""


def test_appending_after_a_torn_line_drops_it_first(tmp_path, capsys):
    # Prepare: a resumes.jsonl cut short (it is only ever appended to)
    run = _log_of(tmp_path, b"")
    (run.path / "resumes.jsonl").write_bytes(b'{"step": 2, "dropped": []}\n{"step": 4, "dr')
    # Execute
    run.log_resume({"step": 6}, ["step-000004"], {"optim.lr": (1e-3, 5e-4)})
    # Assert: the new line stands alone and the file reads back whole
    rows = run.read_metrics("resumes.jsonl")
    assert rows == [
        {"step": 2, "dropped": []},
        {
            "step": 6,
            "dropped": ["step-000004"],
            "changed": {"optim.lr": [1e-3, 5e-4]},
            "wall_s_before": 0.0,  # no call before it logged a timing line
        },
    ]
    assert "resumes.jsonl: dropped its last line" in capsys.readouterr().err


def test_a_last_line_missing_only_its_newline_is_kept(tmp_path):
    run = _log_of(tmp_path, b'{"step": 1}\n{"step": 2}')
    run.log({"step": 3})
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]


def test_truncate_rewrites_through_a_synced_temporary_sibling(tmp_path, monkeypatch):
    # Prepare: a log, and os.replace recorded (a kill before it leaves the old file whole)
    import edgetune.runs as runs

    run = _log_of(tmp_path, b"".join(b'{"round": %d}\n' % r for r in range(4)) + b'{"rou')
    replaced = []
    real_replace = runs.os.replace

    def spy(src, dst):
        replaced.append((Path(src).name, Path(dst).name, Path(src).read_bytes()))
        assert run.metrics_path.read_bytes().endswith(b'{"rou')  # untouched until now
        real_replace(src, dst)

    monkeypatch.setattr(runs.os, "replace", spy)
    # Execute
    run.truncate_after(1, key="round")
    # Assert
    assert replaced == [("metrics.jsonl.tmp", "metrics.jsonl", b'{"round": 0}\n{"round": 1}\n')]
    assert run.metrics_path.read_bytes() == b'{"round": 0}\n{"round": 1}\n'
    assert not (run.path / "metrics.jsonl.tmp").exists()
