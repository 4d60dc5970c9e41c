"""`finetune --method auto`: the first of fo, prge, zo whose estimated peak fits the
budget runs, and the run records it; nothing fitting, or a setting the chosen method
ignores, is refused before training."""

from __future__ import annotations

import json

import pytest
import yaml

from edgetune.models import load
from edgetune.train.memory import method_memory_mb


@pytest.fixture(scope="module")
def estimates(stories260k_path):
    model, _ = load(str(stories260k_path))
    params = sum(p.numel() for p in model.parameters())
    return {m: method_memory_mb(params, m) for m in ("fo", "prge", "zo")}


@pytest.mark.parametrize("afford, chosen", [("fo", "fo"), ("prge", "prge"), ("zo", "zo")])
def test_auto_runs_the_first_method_that_fits_and_records_it(
    tmp_path, tiny_args, cli, estimates, afford, chosen
):
    # Prepare: a budget just above the estimate of `afford` (below the next costlier one)
    budget = estimates[afford] * 1.01
    out = tmp_path / "run"
    # Execute
    assert cli(tiny_args(out, f"train.memory_mb={budget}", method="auto", steps=2)) == 0
    # Assert: the chosen method ran, and config.yaml holds it (a resume runs it again)
    summary = json.loads((out / "summary.json").read_text())
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert summary["method"] == chosen and config["train"]["method"] == chosen
    assert config["train"]["memory_mb"] == pytest.approx(budget)


def test_auto_with_no_method_that_fits_names_each_estimate(
    tmp_path, tiny_args, cli, capsys, estimates
):
    budget = estimates["zo"] * 0.5
    status = cli(tiny_args(tmp_path / "run", f"train.memory_mb={budget}", method="auto"))
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert f"train.method=auto: no method fits {budget:.0f} MB (train.memory_mb)" in err
    assert f"fo ~{estimates['fo']:.0f} MB" in err and "peft.layers=top:K" in err


def test_a_zo_setting_is_refused_once_auto_chose_first_order(tmp_path, tiny_args, cli, capsys):
    args = tiny_args(tmp_path / "run", "train.memory_mb=100000", "zo.queries=3", method="auto")
    assert cli(args) == 2
    assert "zo.queries=3 is not used by train.method='fo'" in capsys.readouterr().err


def test_a_memory_budget_without_auto_is_refused(tmp_path, tiny_args, cli, capsys):
    assert cli(tiny_args(tmp_path / "run", "train.memory_mb=500", method="zo")) == 2
    assert "train.memory_mb=500 is read only by train.method=auto" in capsys.readouterr().err
