"""`edgetune report` on a real FedSpine run (stories260K, 2 rounds): the arm plot, the
sparsity by round, the mean ratio per device class and what each class deploys; a FedIT
report has none of them."""

from __future__ import annotations

import json
import shutil

from edgetune.report import federated, pruned
from edgetune.report.run_info import load_run
from edgetune.runs import RunDir


def test_fedspine_report_lists_every_deployed_class_and_plots_the_arms(spine_run, report, md_table):
    # Prepare
    classes = json.loads((spine_run / "summary.json").read_text())["classes"]
    rows = RunDir(spine_run, resume=True).read_metrics()
    clients = RunDir(spine_run, resume=True).read_metrics("clients.jsonl")
    # Execute
    text = report(spine_run)
    # Assert: the arm plot is written and captioned like the others
    assert "![pruning ratio (share of units pruned) against round](arm_choices.png)" in text
    assert (spine_run / "arm_choices.png").read_bytes()[:4] == b"\x89PNG"
    # every class from summary.json, with its arm, ratio, rank and params
    deployed = md_table(text, "| device class |")
    head = ["device class", "devices", "arm", "pruning ratio", "rank", "params"]
    assert deployed[0][:6] == head
    assert "held-out accuracy" in deployed[0]  # the deployables were scored, and timed
    assert {r[0]: r[1:6] for r in deployed[2:]} == {
        name: [
            str(c["devices"]),
            c["arm"],
            f"{c['ratio']:.3f}",
            str(c["rank"]),
            f"{c['params']:,}",
        ]
        for name, c in classes.items()
    }
    # the rounds table adds the scheduled sparsity and the evaluated sub-model's size
    rounds = md_table(text, "| round |")
    assert rounds[0][3:5] == ["sparsity", "evaluated params"]
    assert [r[3:5] for r in rounds[2:]] == [
        [f"{r['sparsity']:.3f}", f"{r['params']:,.0f}"] for r in rows
    ]
    assert rounds[-1][3] == "0.500"  # the last round is evaluated at the target
    # the device table: the mean ratio each class trained at (clients that finished)
    devices = md_table(text, "| device |")
    assert devices[0][2] == "mean pruning ratio (ok)"
    for row in devices[2:]:
        ok = [c["ratio"] for c in clients if c["device"] == row[0] and c["status"] == "ok"]
        assert row[2] == (f"{sum(ok) / len(ok):.3f}" if ok else "-")


def test_arm_plot_has_a_marker_per_client_with_a_ratio_and_the_schedule(spine_run):
    # Prepare
    run = load_run(spine_run)
    rows = federated.round_rows(run)
    with_ratio = [c for c in run.clients if c.get("ratio") is not None]
    # Execute
    ax = pruned.figures(run, rows)["arm_choices.png"].axes[0]
    # Assert: one marker per entry; hollow for a client that was asked but did not train
    markers = [line for line in ax.lines if len(line.get_xdata()) == 1]
    assert sorted(float(m.get_ydata()[0]) for m in markers) == sorted(
        c["ratio"] for c in with_ratio
    )
    hollow = [m for m in markers if m.get_markerfacecolor() == "none"]
    assert len(hollow) == sum(c["status"] != "ok" for c in with_ratio)
    for m, c in zip(markers, with_ratio, strict=True):  # each near its round
        assert abs(m.get_xdata()[0] - c["round"]) < 0.5
    (schedule,) = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert list(schedule.get_ydata()) == [r["sparsity"] for r in rows]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("round", "pruning ratio (share of units pruned)")
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {c["device"] for c in with_ratio} | {"scheduled sparsity"} <= legend
    assert {f"rank {c['rank']}" for c in with_ratio} <= legend


def test_deployed_table_adds_further_numeric_keys_and_dashes_missing_ones():
    classes = {
        "rpi5": {"arm": "1.5x r8", "ratio": 0.45, "rank": 8, "params": 123456, "devices": 2},
        "jetson": {
            "arm": "0.5x r4",
            "ratio": 0.15,
            "rank": 4,
            "params": 200000,
            "devices": 1,
            "eval/accuracy": 0.8125,
            "tokens_per_s": 41.25,
            "folder": "deploy/jetson",  # not a number: left out
        },
    }
    header, _, *rows = pruned.deployed_table(classes)
    assert header == (
        "| device class | devices | arm | pruning ratio | rank | params | held-out accuracy | "
        "tokens per s |"
    )
    assert rows == [
        "| jetson | 1 | 0.5x r4 | 0.150 | 4 | 200,000 | 0.812 | 41.250 |",
        "| rpi5 | 2 | 1.5x r8 | 0.450 | 8 | 123,456 | - | - |",
    ]


def test_an_unfinished_fedspine_run_says_the_classes_are_not_recorded_yet(
    spine_run, tmp_path, report
):
    run = tmp_path / "killed"
    shutil.copytree(spine_run, run)
    (run / "summary.json").unlink()
    text = report(run)
    assert "## Deployed per device class\n\nNot recorded yet" in text
    assert "| device class |" not in text and "](arm_choices.png)" in text


def test_a_fedit_report_has_no_arm_plot_and_no_spine_columns(federate_run, report, md_table):
    text = report(federate_run)
    assert "arm_choices.png" not in text and not (federate_run / "arm_choices.png").exists()
    assert "Deployed per device class" not in text
    assert "sparsity" not in md_table(text, "| round |")[0]
    assert "mean pruning ratio (ok)" not in md_table(text, "| device |")[0]
