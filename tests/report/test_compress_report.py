"""`edgetune report` on a compress run: the stage table (size, parameters, speed, metric
per stage) and the Pareto plots of speed and size against accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgetune.report import compress
from edgetune.report.run_info import load_run

SUMMARY = {
    "command": "compress",
    "params_before": 260032,
    "params_after": 250112,
    "model_bytes_before": 1065793,
    "model_bytes_after": 351197,
    "before": {"metrics": {"eval/accuracy": 0.375}, "prefill_ms": 4.3, "decode_tokens_per_s": 376.0},
    "after-prune": {"metrics": {"eval/accuracy": 0.3125}, "prefill_ms": 4.7, "decode_tokens_per_s": 342.0},
    "after-recover": {"metrics": {"eval/accuracy": 0.4375}, "prefill_ms": 4.7, "decode_tokens_per_s": 342.0},
    "after-quantize": {"metrics": {"eval/accuracy": 0.4375}, "prefill_ms": 9.3, "decode_tokens_per_s": 205.0},
    "wall_s": 6.1,
    "peak_rss_mb": 463.0,
}  # fmt: skip
CONFIG = {
    "model": "/m/stories260K",
    "data": {"dataset": "sst2", "task": "classification", "max_length": 32},
    "prune": {"ratio": 0.3, "units": "mlp,heads"},
    "recover": {"method": "zo"},
    "quantize": "int8",
    "seed": 0,
}


def write_run(folder: Path, summary: dict | None) -> Path:
    import yaml

    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    lines = [{"stage": s, **SUMMARY[s]["metrics"]} for s in compress.STAGES]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_the_stage_table_has_size_params_speed_and_accuracy_per_stage(tmp_path, md_table):
    run = write_run(tmp_path / "run", SUMMARY)

    text = compress.write(load_run(run)).read_text()

    assert text.startswith("# stories260K on sst2: prune 0.3 (mlp,heads), recover zo, int8\n")
    table = md_table(text, "| stage |")
    assert table[0] == [
        "stage", "parameters", "size on disk (MB)", "prefill (ms)", "decode (tokens/s)",
        "held-out accuracy",
    ]  # fmt: skip
    assert table[2:] == [
        ["before", "260,032", "1.066", "4.3", "376.0", "0.375"],
        ["after-prune", "250,112", "-", "4.7", "342.0", "0.312"],
        ["after-recover", "250,112", "-", "4.7", "342.0", "0.438"],
        ["after-quantize", "250,112", "0.351", "9.3", "205.0", "0.438"],
    ]
    assert "wall time 6.1 s" in text
    assert (run / "pareto_speed.png").is_file() and (run / "pareto_size.png").is_file()


def test_pareto_plots_fill_the_stages_no_other_beats(tmp_path):
    rows = compress.stages(load_run(write_run(tmp_path / "run", SUMMARY)))

    speed = compress.pareto_figure(rows, "eval/accuracy", "decode_tokens_per_s", title="t")
    size = compress.pareto_figure(rows, "eval/accuracy", "size_mb", title="t")

    def filled(fig) -> dict[tuple[float, float], bool]:
        points = [line for line in fig.axes[0].lines if len(line.get_xdata()) == 1]
        return {
            (p.get_xdata()[0], p.get_ydata()[0]): p.get_markerfacecolor() != "none" for p in points
        }

    # speed: before (fastest) and after-recover (most accurate at 342) are the front;
    # after-prune is slower and worse than before, after-quantize slower than after-recover
    assert filled(speed) == {(376.0, 0.375): True, (342.0, 0.3125): False, (342.0, 0.4375): True, (205.0, 0.4375): False}  # fmt: skip
    # size is measured for the input and the saved model only; the saved one is smaller
    # and more accurate, so the input model is dominated
    assert filled(size) == {(1.065793, 0.375): False, (0.351197, 0.4375): True}
    for fig in (speed, size):
        ax = fig.axes[0]
        assert ax.get_ylim() == (0.0, 1.0) and ax.get_xlim()[0] == 0.0
    assert speed.axes[0].get_xlabel() == "decode speed (tokens/s)"


@pytest.mark.parametrize(
    ("points", "x_up", "y_up", "front"),
    [
        ([(1, 1), (2, 2), (3, 1)], True, True, [False, True, True]),
        ([(1, 1), (2, 2), (3, 1)], False, True, [True, True, False]),
        ([(1, 5), (1, 5)], True, True, [True, True]),  # ties dominate nothing
    ],
)
def test_pareto_optimal(points, x_up, y_up, front):
    assert compress.pareto_optimal(points, x_up, y_up) == front


def test_an_unfinished_compress_run_reports_its_logged_stages(tmp_path, md_table):
    run = load_run(write_run(tmp_path / "run", None))
    assert run.command == "compress"

    text = compress.write(run).read_text()

    assert [row[0] for row in md_table(text, "| stage |")[2:]] == list(compress.STAGES)
    assert "has not finished" in text


def test_edgetune_report_on_a_real_compress_run(
    cli, stories260k_path, shared_data, tmp_path, md_table
):
    out = tmp_path / "compress"
    args = [
        "compress", "--model", str(stories260k_path), "--dataset", "sst2", "--out", str(out),
        "--calib", "8", "data.train_size=64", "data.eval_size=16", "data.max_length=32",
        "progress=false", "--prune", "0.3", "--quantize", "int8", "--threads", "1",
    ]  # fmt: skip
    assert cli(args) == 0

    assert cli(["report", str(out)]) == 0

    text = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    table = md_table(text, "| stage |")
    assert [row[0] for row in table[2:]] == ["before", "after-prune", "after-quantize"]
    assert table[2][1] == f"{summary['params_before']:,}"
    assert table[4][2] == f"{summary['model_bytes_after'] / 1e6:.3f}"
    assert table[4][5] == f"{summary['after-quantize']['metrics']['eval/accuracy']:.3f}"
    assert "![held-out accuracy against decode speed (tokens/s)](pareto_speed.png)" in text
