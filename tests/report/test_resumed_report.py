"""A resumed run's report: wall time summed over its calls (the killed one included), the
resume marked on the plots; and the lm task's packing said in the help and the report."""

from __future__ import annotations

import json
import re

import pytest

from edgetune.report import single
from edgetune.report.run_info import RunRecord, load_run, what_was_run
from edgetune.runs import RunDir


def finetune_args(model, out, steps=6):
    return [
        "finetune", "--model", str(model), "--dataset", "sst2", "--method", "zo",
        "--steps", str(steps), "--batch-size", "4", "--out", str(out), "--threads", "1",
        "data.train_size=64", "data.eval_size=16", "data.max_length=32",
        "train.eval_every=2", "train.checkpoint_every=2", "train.progress=false",
    ]  # fmt: skip


def test_a_resumed_run_reports_its_wall_time_summed_over_the_calls(
    tmp_path, stories260k_path, shared_data, cli, run_torn, capsys
):
    # Prepare: a run killed while logging step 5, resumed from its step-4 checkpoint
    run = tmp_path / "run"
    run_torn(finetune_args(stories260k_path, run), "metrics.jsonl", "step", 5)
    killed_at = max(r["wall_s"] for r in RunDir(run, resume=True).read_metrics("timing.jsonl"))
    assert cli(["finetune", "--resume", str(run), "--threads", "1"]) == 0
    capsys.readouterr()
    # Execute
    assert cli(["report", str(run)]) == 0
    # Assert: the killed call's time is carried into resumes.jsonl and the report sums
    (resume,) = RunDir(run, resume=True).read_metrics("resumes.jsonl")
    last = json.loads((run / "summary.json").read_text())["wall_s"]
    assert resume["step"] == 4 and resume["wall_s_before"] == killed_at > 0
    text = (run / "report.md").read_text()
    total = f"{resume['wall_s_before'] + last:.1f}"
    assert f"wall time {total} s over 2 calls (1 --resume; the last call {last:.1f} s)" in text
    assert "Resumed 1 time(s), continuing from step 4" in text
    # the timing stamps after the resume go on from the killed call's time
    timing = RunDir(run, resume=True).read_metrics("timing.jsonl")
    assert [t["step"] for t in timing] == [1, 2, 3, 4, 5, 6]
    assert all(t["wall_s"] > killed_at for t in timing if t["step"] > 4)
    # and the plots mark the resume at step 4
    for name, fig in single.figures(load_run(run)).items():
        marks = [ln for ln in fig.axes[0].lines if ln.get_label() == "resumed (--resume)"]
        assert [list(m.get_xdata()) for m in marks] == [[4, 4]], name


def test_a_run_never_resumed_reports_its_one_call():
    run = RunRecord(path=None, command="finetune", config={}, summary={"wall_s": 5.04})  # type: ignore[arg-type]
    assert single.cost(run) == "wall time 5.0 s; peak RSS of the process - MB."


def test_the_lm_task_says_documents_are_packed_into_blocks(cli, capsys):
    with pytest.raises(SystemExit):
        cli(["finetune", "--help"])
    help_text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "for --task lm a cap on documents, which are packed into blocks" in help_text

    config = {"data": {"dataset": "tinystories", "task": "lm", "max_length": 32, "train_size": 64}}
    run = RunRecord(path=None, command="finetune", config=config, summary={"train_examples": 204})  # type: ignore[arg-type]
    (data,) = [line for line in what_was_run(run) if line.startswith("- **data**")]
    assert data == (
        "- **data**: tinystories (204 training examples), at most 32 tokens per example; "
        "lm task: at most 64 documents packed end to end into blocks of 32 tokens, one "
        "example per block (so the examples count blocks, not documents)"
    )
