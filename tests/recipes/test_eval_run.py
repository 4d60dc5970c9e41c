"""`edgetune eval RUN` and `eval --adapter RUN/adapter`: the run's own model, data and
prompt settings, only held-out rows, and a clear error for settings that contradict the
run."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from edgetune.data import DataConfig
from edgetune.data.splits import load_held_out, load_splits


def _csv(tmp_path, rows: int = 60):
    """A two-class CSV whose every text is unique (so rows can be told apart)."""
    lines = ["text,label"]
    lines += [
        f"film number {i} was {'great' if i % 2 else 'awful'},{'pos' if i % 2 else 'neg'}"
        for i in range(rows)
    ]
    path = tmp_path / "films.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def csv_run(tmp_path, stories260k_path, cli):
    """A finished fo run on a CSV with no eval split: 10 held out, 30 trained, 20 unused."""
    out = tmp_path / "run"
    args = [
        "finetune",
        "--model",
        str(stories260k_path),
        "--dataset",
        str(_csv(tmp_path)),
        "--method",
        "fo",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--out",
        str(out),
        "data.eval_size=10",
        "data.train_size=30",
        "data.max_length=32",
        "train.progress=false",
    ]
    assert cli(args) == 0
    return out


def test_eval_run_reproduces_the_runs_final_evaluation(csv_run, cli, capsys):
    summary = json.loads((csv_run / "summary.json").read_text())
    capsys.readouterr()

    assert cli(["eval", str(csv_run), "progress=false"]) == 0
    by_run = json.loads(capsys.readouterr().out)
    assert cli(["eval", "--adapter", str(csv_run / "adapter"), "progress=false"]) == 0
    by_adapter = json.loads(capsys.readouterr().out)

    for result in (by_run, by_adapter):
        assert result["eval_examples"] == 10
        assert result["eval/accuracy"] == pytest.approx(summary["eval/accuracy"])
        assert result["eval/loss"] == pytest.approx(summary["eval/loss"], rel=1e-5)


def test_another_seed_or_size_draws_only_rows_the_run_did_not_train_on(csv_run, tmp_path):
    saved = yaml.safe_load((csv_run / "config.yaml").read_text())
    data = DataConfig(**saved["data"])
    trained = {r["fields"]["text"] for r in load_splits(data, saved["seed"]).train}
    assert len(trained) == 30

    for eval_size, seed in [(10, 0), (30, 0), (30, 7), (5, 123)]:
        held = load_held_out(data, saved["seed"], eval_size, seed)
        texts = {r["fields"]["text"] for r in held.eval}
        assert len(texts) == eval_size
        assert not texts & trained


def test_an_eval_size_beyond_the_held_out_rows_is_refused(csv_run, cli, capsys):
    status = cli(["eval", str(csv_run), "--eval-size", "31", "--seed", "3"])
    err = capsys.readouterr().err
    assert status == 2
    assert "--eval-size 30 or less" in err and "Traceback" not in err


def test_settings_that_contradict_the_run_name_the_fix(csv_run, cli, capsys):
    status = cli(["eval", str(csv_run), "--model", "smollm2-135m", "--max-length", "64"])
    err = capsys.readouterr().err
    assert status == 2
    assert "model='smollm2-135m'" in err and "data.max_length=64" in err
    assert "only --eval-size and --seed may change" in err and "Traceback" not in err


def test_a_folder_without_a_run_is_a_clear_error(tmp_path, cli, capsys):
    status = cli(["eval", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2 and "is not a run directory" in err


def test_a_copied_adapter_finds_its_base_model_and_refuses_another(
    csv_run, tmp_path, cli, capsys, stories260k_path
):
    copy = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(csv_run / "adapter", copy)  # no config.yaml beside it
    data = ["--dataset", str(tmp_path / "films.csv"), "data.max_length=32", "--eval-size", "10"]
    capsys.readouterr()

    assert cli(["eval", "--adapter", str(copy), *data, "progress=false"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == str(stories260k_path.resolve())

    status = cli(["eval", "--adapter", str(copy), "--model", "smollm2-135m", *data])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "was trained on a different model" in err
    assert f"pass --model {stories260k_path.resolve()}" in err


def test_eval_of_a_federate_run_reproduces_its_final_evaluation(
    tmp_path, stories260k_path, cli, capsys
):
    out = tmp_path / "fed"
    args = ["federate", "--model", str(stories260k_path), "--dataset", str(_csv(tmp_path))]
    args += ["--clients", "2", "--rounds", "1", "--local-steps", "1", "--out", str(out)]
    args += ["data.eval_size=10", "data.max_length=32", "train.progress=false"]
    assert cli(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()

    assert cli(["eval", str(out), "progress=false"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval_examples"] == 10
    assert result["eval/accuracy"] == pytest.approx(summary["eval/accuracy"])
    assert result["eval/loss"] == pytest.approx(summary["eval/loss"], rel=1e-5)


def test_eval_run_of_a_selective_fine_tune_uses_its_saved_model(
    tmp_path, stories260k_path, cli, capsys
):
    out = tmp_path / "last-n"
    args = ["finetune", "--model", str(stories260k_path), "--dataset", str(_csv(tmp_path))]
    args += ["--method", "fo", "--peft", "last-n", "--steps", "3", "--out", str(out)]
    args += ["--lr", "0.01", "data.eval_size=10", "data.max_length=32", "train.progress=false"]
    args += ["train.keep=last"]  # the saved model must differ from the base for the check
    assert cli(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()

    assert cli(["eval", str(out), "progress=false"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval/loss"] == pytest.approx(summary["eval/loss"], rel=1e-5)
    assert result["eval/loss"] != pytest.approx(summary["initial_eval"]["eval/loss"], rel=1e-5)
