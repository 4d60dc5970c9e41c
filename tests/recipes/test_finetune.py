"""`edgetune finetune` end to end on a real pretrained model: the run-directory contract,
determinism, resume == uninterrupted, replay of ZO traces, divergence handling."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from edgetune.runs import RunDir
from edgetune.train.config import RECIPE_LR


@pytest.mark.parametrize("method", ["zo", "fo", "prge"])
def test_run_directory_contract(tmp_path, tiny_args, cli, method, stories260k_path):
    out = tmp_path / method
    extra = ["--queries", "2"] if method == "prge" else []
    assert cli(tiny_args(out, *extra, method=method)) == 0
    # config.yaml is the resolved config
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["method"] == method
    # no --lr: first-order's default step size, or the default ZO recipe's
    recipe = (1e-3, "auto") if method == "fo" else (RECIPE_LR, "rms")
    assert (config["optim"]["lr"], config["zo"]["scale"]) == recipe
    # metrics.jsonl: training lines with step + loss, eval lines with eval/*
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(0.0 <= r["eval/accuracy"] <= 1.0 and r["eval/loss"] > 0 for r in evals)
    # timing.jsonl: wall-clock per step, cumulative training seconds increasing
    timing = RunDir(out, resume=True).read_metrics("timing.jsonl")
    assert [t["step"] for t in timing] == [1, 2, 3, 4]
    assert all(b["train_s"] > a["train_s"] > 0 for a, b in zip(timing, timing[1:], strict=False))
    # summary.json
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_s"] > 0 and summary["peak_rss_mb"] > 50
    assert summary["eval/accuracy"] == evals[-1]["eval/accuracy"]
    assert summary["status"] == "done" and summary["steps"] == 4
    # adapter/ loads with PEFT and changed the model
    from transformers import AutoModelForCausalLM

    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(stories260k_path)
    ids = torch.tensor([[1, 50, 60, 70]])
    before = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, out / "adapter")
    assert (tuned(input_ids=ids).logits - before).abs().max() > 0


def test_same_seed_same_metrics_byte_for_byte(tmp_path, tiny_args, cli):
    for name in ("a", "b"):
        assert cli(tiny_args(tmp_path / name)) == 0
    assert cli(tiny_args(tmp_path / "c", "--seed", "1")) == 0
    a, b, c = ((tmp_path / n / "metrics.jsonl").read_bytes() for n in "abc")
    assert a == b
    assert a != c


class _Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["zo", "fo", "prge"])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, tiny_args, cli, monkeypatch, method):
    # Prepare: the uninterrupted reference (6 steps, checkpoints every 2)
    assert cli(tiny_args(tmp_path / "straight", method=method, steps=6)) == 0
    # Execute: a run killed right after logging step 5 (checkpoint at 4 is the last)
    original = RunDir.log

    def log_then_die(self, record, file="metrics.jsonl"):
        original(self, record, file)
        if record.get("step") == 5 and "loss" in record and file == "metrics.jsonl":
            raise _Killed

    monkeypatch.setattr(RunDir, "log", log_then_die)
    with pytest.raises(_Killed):
        cli(tiny_args(tmp_path / "killed", method=method, steps=6))
    monkeypatch.setattr(RunDir, "log", original)
    assert cli(["finetune", "--resume", str(tmp_path / "killed")]) == 0
    # Assert: same adapter bit for bit, same metrics file
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "straight" / "metrics.jsonl").read_bytes() == (
        tmp_path / "killed" / "metrics.jsonl"
    ).read_bytes()


@pytest.mark.parametrize("method", ["zo", "prge"])
def test_replaying_the_zo_trace_rebuilds_the_adapter_bit_for_bit(
    tmp_path, tiny_args, cli, stories260k_path, method
):
    # Prepare: a ZO run records (seeds, scalars, lr) per step in trace.jsonl
    out = tmp_path / "run"
    assert cli(tiny_args(out, "--queries", "2", method=method, steps=5)) == 0
    trace = RunDir(out, resume=True).read_metrics("trace.jsonl")
    assert len(trace) == 5 and all(len(t["seeds"]) == 2 for t in trace)
    # Execute: a fresh adapter with the same init, updated only from the trace
    from edgetune import models
    from edgetune.peft import PeftConfig, attach
    from edgetune.zo import ZOEstimate, apply_estimate

    model, _ = models.load(str(stories260k_path))
    adapter = attach(model, PeftConfig(), seed=0)
    for t in trace:
        apply_estimate(adapter.trainable(), ZOEstimate(t["seeds"], t["scalars"], 0.0), t["lr"])
    # Assert
    trained = load_file(out / "adapter" / "adapter_model.safetensors")
    replayed = {k.replace(".default", ""): v for k, v in adapter.state_dict().items()}
    assert trained.keys() == replayed.keys()
    assert all(torch.equal(trained[k], replayed[k]) for k in trained)


def test_diverging_run_stops_with_a_clear_error_and_keeps_its_checkpoint(
    tmp_path, tiny_args, cli, capsys
):
    out = tmp_path / "boom"
    # the guard off: its rollbacks are tested in tests/train/test_guard.py
    status = cli(
        tiny_args(out, "--lr", "1e6", "train.checkpoint_every=1", "train.guard=false", steps=6)
    )
    assert status == 2
    err = capsys.readouterr().err
    assert "diverged" in err and "--resume" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged"
    from edgetune.train.checkpoint import list_checkpoints, load_checkpoint

    saved = list_checkpoints(out)
    assert saved, "the last good checkpoint must survive"
    adapter_state, _, loop = load_checkpoint(saved[-1])
    assert all(torch.isfinite(t).all() for t in adapter_state.values())
    assert loop["step"] >= 1
