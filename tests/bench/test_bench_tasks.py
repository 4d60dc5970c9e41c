"""`edgetune bench tasks --quick`: every row a real process on stories260K, the table
built from the runs' own files, and bad names refused."""

from __future__ import annotations

import json

from edgetune.bench.tasks import seconds_to


def test_bench_tasks_quick_runs_end_to_end_and_tables_the_runs(tmp_path, cli, stories260k_path):
    # Execute
    output, work = tmp_path / "BENCH.md", tmp_path / "work"
    args = ["bench", "tasks", "--quick", "--model", str(stories260k_path), "--tasks", "sst2"]
    args += ["--seeds", "0", "--rows", "fo,zo-prge", "--work", str(work)]
    assert cli([*args, "--output", str(output), "--threads", "1"]) == 0
    # Assert: a row per run, with the figures each run's summary holds
    text = output.read_text()
    assert "<!-- bench:tasks -->" in text and "### sst2 (eval/accuracy" in text
    assert (tmp_path / "bench_tasks.png").stat().st_size > 0
    for row in ("zero-shot", "fo", "zo-prge"):
        summary = json.loads((work / "sst2" / "seed0" / row / "summary.json").read_text())
        line = next(x for x in text.splitlines() if x.startswith(f"| {row} | 0 |"))
        assert line.split("|")[3].strip() == f"{summary['eval/accuracy']:.3f}"
    zo = json.loads((work / "sst2" / "seed0" / "zo-prge" / "summary.json").read_text())
    assert zo["kept"]["policy"] == "best"  # the default recipe keeps the best adapter
    config = (work / "sst2" / "seed0" / "zo-prge" / "config.yaml").read_text()
    assert "scale: rms" in config  # and normalises the scalars (no --lr given)
    # Execute again: finished runs are reused, not rerun
    before = (work / "sst2" / "seed0" / "fo" / "metrics.jsonl").stat().st_mtime_ns
    assert cli([*args, "--output", str(output), "--threads", "1"]) == 0
    assert (work / "sst2" / "seed0" / "fo" / "metrics.jsonl").stat().st_mtime_ns == before


def test_bench_tasks_refuses_unknown_tasks_and_rows(tmp_path, cli, capsys):
    out = ["--output", str(tmp_path / "B.md"), "--work", str(tmp_path / "w")]
    assert cli(["bench", "tasks", "--tasks", "imdb", *out]) == 2
    assert "unknown task imdb" in capsys.readouterr().err
    assert cli(["bench", "tasks", "--quick", "--rows", "fo-top6", *out]) == 2
    assert "unknown row fo-top6 in --quick mode" in capsys.readouterr().err
    assert cli(["bench", "memory", "--rows", "fo", *out]) == 2
    assert "does not use --rows" in capsys.readouterr().err
    assert not (tmp_path / "B.md").exists()


def test_seconds_to_a_target_reads_the_first_evaluation_past_it():
    curve = [(0.0, 0.5), (10.0, 0.6), (20.0, 0.8), (30.0, 0.7)]
    assert seconds_to(curve, 0.75, up=True) == 20.0
    assert seconds_to(curve, 0.9, up=True) is None
    assert seconds_to([(0.0, 3.0), (5.0, 2.0)], 2.5, up=False) == 5.0
