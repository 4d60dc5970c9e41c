"""`edgetune eval --task hellaswag` end to end on stories260K: the printed and saved
metrics, the seeded sample, and a fine-tuned run's adapter scored by either path."""

from __future__ import annotations

import json

import pytest


def _hs(model, *extra: str) -> list[str]:
    return [
        "eval", "--model", str(model), "--task", "hellaswag", "--eval-size", "12",
        "--threads", "1", "progress=false", *extra,
    ]  # fmt: skip


def test_eval_hellaswag_prints_and_saves_acc_and_acc_norm(stories260k_path, cli, capsys, tmp_path):
    # Execute
    status = cli(_hs(stories260k_path, "--out", str(tmp_path / "out")))
    captured = capsys.readouterr()
    # Assert
    assert status == 0
    summary = json.loads(captured.out)
    assert summary["benchmark"] == "hellaswag" and summary["eval_examples"] == 12
    for key in ("acc", "acc_norm"):
        value = summary[f"eval/{key}"]
        assert value * 12 == round(value * 12)  # a count out of the 12 tasks
        assert summary[f"eval/{key}_ci95_low"] <= value <= summary[f"eval/{key}_ci95_high"]
    assert "hellaswag (12 items): acc " in captured.err and "acc_norm" in captured.err
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["eval/acc_norm"] == summary["eval/acc_norm"]


def test_eval_hellaswag_sample_follows_the_seed(stories260k_path, cli, capsys, tmp_path):
    cli(_hs(stories260k_path, "--out", str(tmp_path / "a")))
    cli(_hs(stories260k_path, "--out", str(tmp_path / "b")))
    capsys.readouterr()

    a, b = (json.loads((tmp_path / x / "summary.json").read_text()) for x in "ab")

    assert {k: v for k, v in a.items() if k.startswith("eval/")} == {
        k: v for k, v in b.items() if k.startswith("eval/")
    }


@pytest.fixture
def fo_run(tmp_path, tiny_args, cli, capsys):
    out = tmp_path / "run"
    assert cli(tiny_args(out, method="fo", steps=2)) == 0
    capsys.readouterr()
    return out


def test_a_runs_adapter_scores_the_same_by_run_or_adapter(fo_run, stories260k_path, cli, capsys):
    # Execute
    assert cli(["eval", str(fo_run), "--task", "hellaswag", "--eval-size", "8"]) == 0
    by_run = json.loads(capsys.readouterr().out)
    adapter = str(fo_run / "adapter")
    assert cli(["eval", "--adapter", adapter, "--task", "hellaswag", "--eval-size", "8"]) == 0
    by_adapter = json.loads(capsys.readouterr().out)
    # Assert
    assert by_run["adapter"] == by_adapter["adapter"] == adapter
    assert by_run["model"] == by_adapter["model"] == str(stories260k_path)
    assert by_run["eval/acc"] == by_adapter["eval/acc"]
    assert by_run["eval/acc_norm"] == by_adapter["eval/acc_norm"]
