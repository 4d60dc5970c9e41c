"""`report_to`: TensorBoard, MLflow and W&B hold every metric line of metrics.jsonl and
the resolved config, read back with the stock readers (TensorBoard's EventAccumulator,
MLflow's MlflowClient on the local file store). W&B 0.31 ships no offline reader in
Python (its core reads the run file in Go), so its run file is read as the LevelDB log it
is and each record decoded with W&B's own protobuf definitions."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from pathlib import Path

import pytest
import yaml

from edgetune import track
from edgetune.config import leaves
from edgetune.errors import ConfigError

pytest.importorskip("tensorboard", reason="report_to tests need pip install 'edgetune[track]'")
pytest.importorskip("mlflow", reason="report_to tests need pip install 'edgetune[track]'")
pytest.importorskip("wandb", reason="report_to tests need pip install 'edgetune[track]'")
ALL = "tensorboard,mlflow,wandb"


def expected(run: Path) -> dict[tuple[str, int], float]:
    """{(metric, step): value} for every numeric field of every metrics.jsonl line, as the
    trackers name them (compress stage lines: `stage/<field>` at the stage's ordinal)."""
    out: dict[tuple[str, int], float] = {}
    stages = 0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "stage" in row and "step" not in row:
            fields, step, prefix = row, stages, "stage/"
            stages += 1
        else:
            key = "step" if "step" in row else "round"
            fields, step, prefix = {k: v for k, v in row.items() if k != key}, row[key], ""
        for name, value in fields.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[(prefix + name, step)] = float(value)
    return out


def tensorboard_scalars(run: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


def tensorboard_hparams(run: Path) -> dict[str, object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def as_hparam(value: object) -> object:
    """A config value as TensorBoard's HParams hold it: numbers as floats, booleans and
    strings kept, anything else (None, lists) as text."""
    if isinstance(value, bool | str):
        return value
    return float(value) if isinstance(value, int | float) else str(value)


def mlflow_run(run: Path):
    """(the one MLflow run in RUN/mlruns, {(metric, step): value})."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("edgetune")
    (found,) = client.search_runs([experiment.experiment_id])
    metrics = {
        (m.key, m.step): m.value
        for key in found.data.metrics
        for m in client.get_metric_history(found.info.run_id, key)
    }
    return found, metrics


def wandb_records(run: Path) -> list:
    """The records of the one offline W&B run in RUN/wandb: a 7-byte file header, then
    32 KiB blocks of chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (run / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the zero padding at a block's end
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_run(run: Path) -> tuple[dict[str, object], dict[tuple[str, int], float], int]:
    """(config, {(metric, step): value}, exit code) of the W&B run, as W&B recorded them."""
    config, metrics, exit_code = {}, {}, None
    for record in wandb_records(run):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif kind == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            step = row.pop("step")
            metrics |= {(k, step): v for k, v in row.items() if not k.startswith("_")}
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return config, metrics, exit_code


def assert_trackers_hold_metrics(run: Path) -> None:
    want = expected(run)
    assert want, "metrics.jsonl has no numeric field to mirror"
    scalars = tensorboard_scalars(run)
    assert scalars.keys() == want.keys()
    assert all(scalars[k] == pytest.approx(v, rel=1e-6) for k, v in want.items())  # float32
    found, metrics = mlflow_run(run)
    assert metrics == want
    assert found.info.status == "FINISHED"
    _, history, exit_code = wandb_run(run)
    assert history == want and exit_code == 0


def assert_config_recorded(run: Path) -> None:
    config = leaves(yaml.safe_load((run / "config.yaml").read_text()))
    found, _ = mlflow_run(run)
    assert found.data.params == {k: str(v) for k, v in config.items()}
    assert tensorboard_hparams(run) == {k: as_hparam(v) for k, v in config.items()}
    recorded, _, _ = wandb_run(run)
    assert {k: v for k, v in recorded.items() if not k.startswith("_")} == {
        k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in config.items()
    }


def test_finetune_mirrors_every_metric_line_and_the_config(tmp_path, tiny_args, cli):
    out = tmp_path / "run"
    assert cli([*tiny_args(out), "--threads", "1", "--report-to", ALL]) == 0

    assert {k for k, _ in expected(out)} >= {"loss", "eval/accuracy", "eval/loss"}
    assert_trackers_hold_metrics(out)
    assert_config_recorded(out)


def test_federate_mirrors_every_round(tmp_path, federate_args, cli):
    out = tmp_path / "fed"
    assert cli([*federate_args(out), "--threads", "1", "--report-to", ALL]) == 0

    assert {s for k, s in expected(out) if k == "eval/accuracy"} == {0, 1, 2}
    assert ("bytes_up", 2) in expected(out)
    assert_trackers_hold_metrics(out)
    assert_config_recorded(out)


def test_a_resume_rebuilds_the_trackers_from_metrics_jsonl(tmp_path, tiny_args, cli, run_torn):
    out = tmp_path / "run"
    args = [*tiny_args(out, steps=6), "--threads", "1", "--report-to", ALL]
    run_torn(args, "metrics.jsonl", "step", 3)  # dies after the step-2 checkpoint
    assert cli(["finetune", "--resume", str(out), "--threads", "1"]) == 0

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert_trackers_hold_metrics(out)  # steps 3.. logged twice on disk appear once


def test_compress_mirrors_its_stages_and_recovery_steps(
    tmp_path, stories260k_path, shared_data, cli
):
    out = tmp_path / "compress"
    args = [
        "compress", "--model", str(stories260k_path), "--dataset", "sst2", "--out", str(out),
        "--calib", "8", "data.train_size=64", "data.eval_size=16", "data.max_length=32",
        "progress=false", "--prune", "0.3", "--recover", "zo", "--recover-steps", "2",
        "recover.batch_size=4", "--threads", "1", "--report-to", ALL,
    ]  # fmt: skip
    assert cli(args) == 0

    want = expected(out)
    assert {s for k, s in want if k == "stage/eval/accuracy"} == {0, 1, 2}  # 3 stages
    assert {s for k, s in want if k == "loss"} == {1, 2}  # the recovery's steps
    assert_trackers_hold_metrics(out)


def test_ondevice_mirrors_its_steps(tmp_path, onnx_lora_export, cli):
    pytest.importorskip("onnxruntime", reason="ondevice needs pip install 'edgetune[export]'")
    out = tmp_path / "ondevice"
    args = [
        "ondevice", "--model", str(onnx_lora_export), "--runtime", "ort", "--method", "zo",
        "--steps", "4", "--batch-size", "4", "--out", str(out), "--threads", "1",
        "--dataset", "sst2", "data.max_length=32", "data.train_size=32", "data.eval_size=8",
        "train.eval_every=2", "train.progress=false", "--report-to", ALL,
    ]  # fmt: skip
    assert cli(args) == 0

    assert {s for k, s in expected(out) if k == "loss"} == {1, 2, 3, 4}
    assert_trackers_hold_metrics(out)
    assert_config_recorded(out)


def test_a_missing_tracker_package_stops_before_any_work(
    tmp_path, tiny_args, cli, capsys, monkeypatch
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    out = tmp_path / "run"

    assert cli([*tiny_args(out), "--report-to", "tensorboard,mlflow"]) == 2

    err = capsys.readouterr().err
    assert "report_to=mlflow needs the mlflow-skinny package" in err
    assert "pip install 'edgetune[track]'" in err
    assert not out.exists()


def test_an_unknown_tracker_is_refused_with_the_closest(tmp_path, tiny_args, cli, capsys):
    assert cli([*tiny_args(tmp_path / "run"), "--report-to", "tensorbord"]) == 2
    assert "did you mean 'tensorboard'?" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "names"),
    [
        ("none", []),
        ("mlflow", ["mlflow"]),
        ("tensorboard, mlflow,tensorboard", ["tensorboard", "mlflow"]),
    ],
)
def test_report_to_names(value, names):
    assert track.names(value) == names


def test_report_to_refuses_none_beside_a_tracker():
    with pytest.raises(ConfigError, match="none beside a tracker"):
        track.names("none,mlflow")


class Recorder:
    """A tracker that keeps what it is given."""

    def __init__(self):
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, metrics))


def test_the_mirror_logs_numbers_at_their_step_round_or_stage():
    recorder = Recorder()
    mirror = track.Mirror([recorder])
    rows = [
        {"stage": "before", "eval/accuracy": 0.5, "prefill_ms": 3},
        {"step": 1, "loss": 2.0, "diverged": True, "reason": "x", "rollback": {"a": 1}},
        {"step": 2, "loss": "nan"},  # a non-finite loss as metrics.jsonl writes it
        {"round": 4, "bytes_up": 10},
        {"stage": "after-prune", "eval/accuracy": 0.25},
    ]

    for row in rows:
        mirror.log(row)

    assert recorder.metrics == [
        (0, {"stage/eval/accuracy": 0.5, "stage/prefill_ms": 3.0}),
        (1, {"loss": 2.0}),
        (4, {"bytes_up": 10.0}),
        (1, {"stage/eval/accuracy": 0.25}),
    ]
