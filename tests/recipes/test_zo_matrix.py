"""Every ZO estimator and update rule runs from the CLI (one row each), and P-RGE learns."""

from __future__ import annotations

import json

import pytest

from edgetune.runs import RunDir


@pytest.mark.parametrize(
    "extra",
    [
        ["zo.optimizer=sgd"],
        ["zo.optimizer=momentum"],
        ["zo.optimizer=adam", "--lr", "1e-3"],
        ["zo.optimizer=sign", "--lr", "1e-4"],
        ["zo.estimator=one-sided"],
        ["zo.estimator=fwdgrad", "zo.max_queries=6", "zo.var_threshold=0.5"],
        ["--method", "prge", "--queries", "2", "zo.parallel_inner=false"],
        ["--method", "prge", "--queries", "2", "--peft", "lora-fa"],
    ],
    ids=["sgd", "momentum", "adam", "sign", "one-sided", "fwdgrad", "prge-outer", "prge-lora-fa"],
)
def test_zo_variant_runs_end_to_end(tmp_path, tiny_args, cli, extra):
    out = tmp_path / "run"
    assert cli(tiny_args(out, *extra, steps=3)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 3
    trace = RunDir(out, resume=True).read_metrics("trace.jsonl")
    assert len(trace) == 3 and all(
        t["scalars"] and len(t["seeds"]) == len(t["scalars"]) for t in trace
    )
    if "zo.estimator=fwdgrad" in extra:
        assert all(2 <= len(t["seeds"]) <= 6 for t in trace)


def test_prge_run_on_a_real_model_lowers_the_loss(tmp_path, tiny_args, cli):
    # P-RGE q=4, full batch (16 SST-2 sentences each step) on stories260K: the training
    # loss on that batch must fall (0.805 -> ~0.60 when this test was written)
    out = tmp_path / "prge"
    args = tiny_args(
        out,
        "--queries",
        "4",
        "--lr",
        "2e-3",
        "--batch-size",
        "16",
        "data.train_size=16",
        "train.eval_every=0",
        method="prge",
        steps=40,
    )
    assert cli(args) == 0
    losses = [r["loss"] for r in RunDir(out, resume=True).read_metrics() if "loss" in r]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0]
