"""What a run shows on stderr while it works: the training loss (not the evaluation's) in
the step bar, a bar while evaluating, a line per federated round, and nothing at all with
`train.progress=false`."""

from __future__ import annotations

import json
import re

import pytest

from edgetune.cli import main


@pytest.fixture
def lm_args(stories260k_path, shared_data):
    """A seconds-long lm fine-tune of stories260K on TinyStories."""
    del shared_data

    def make(out, *extra):
        return [
            "finetune",
            "--model",
            str(stories260k_path),
            "--dataset",
            "tinystories",
            "--task",
            "lm",
            "--method",
            "fo",
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--out",
            str(out),
            "data.train_size=24",
            "data.eval_size=6",
            "data.max_length=32",
            "train.eval_every=2",
            *extra,
        ]

    return make


def _frames(err: str) -> list[str]:
    return [f for f in re.split(r"[\r\n]", err) if f.strip()]


def test_step_bar_shows_training_loss_and_labels_the_evaluation(tmp_path, lm_args, capsys):
    out = tmp_path / "lm"
    assert main(lm_args(out)) == 0
    err = capsys.readouterr().err
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_loss = [r["loss"] for r in lines if "loss" in r and "eval/loss" not in r][-1]
    eval_loss = [r["eval/loss"] for r in lines if "eval/loss" in r][-1]
    assert train_loss != pytest.approx(eval_loss)  # so the check below tells them apart

    last = [f for f in _frames(err) if "fo steps" in f and "4/4" in f][-1]
    assert f"loss={train_loss:.4f}" in last
    assert f"eval_loss={eval_loss:.4f}" in last


def test_evaluation_and_model_loading_report_progress(tmp_path, lm_args, capsys):
    out = tmp_path / "lm"
    assert main(lm_args(out)) == 0
    frames = _frames(capsys.readouterr().err)
    blocks = json.loads((out / "summary.json").read_text())["eval_examples"]
    assert frames[0].startswith("edgetune: loading model ")
    eval_frames = [f for f in frames if f.startswith("evaluating")]
    # one bar per evaluation (steps 0, 2 and 4), each over every held-out block
    assert sum(f"| 0/{blocks} " in f for f in eval_frames) == 3, eval_frames


def test_progress_false_leaves_stderr_empty(tmp_path, lm_args, capsys):
    assert main(lm_args(tmp_path / "lm", "train.progress=false")) == 0
    assert capsys.readouterr().err == ""


def test_federate_prints_one_line_per_round(tmp_path, stories260k_path, shared_data, capsys):
    del shared_data
    out = tmp_path / "fed"
    args = [
        "federate",
        "--model",
        str(stories260k_path),
        "--dataset",
        "sst2",
        "--clients",
        "3",
        "--participation",
        "1.0",
        "--fleet",
        "jetsons",
        "--rounds",
        "2",
        "--local-steps",
        "2",
        "--batch-size",
        "4",
        "--out",
        str(out),
        "data.train_size=30",
        "data.eval_size=8",
        "data.max_length=32",
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for record in rounds[1:]:
        line = next(x for x in err.splitlines() if f"round {record['round']}/2:" in x)
        assert f"{record['accepted']} accepted, {record['rejected']} rejected" in line
        assert f"loss {record['loss']:.4f}" in line
        assert f"eval/accuracy {record['eval/accuracy']:.4f}" in line
        assert f"{record['bytes_up'] / 1e3:.1f} KB up" in line
    assert "round 0/2 (before training): eval/accuracy" in err
