"""`edgetune report DIR` on real tiny runs: single-device (finetune, eval) and federated
reports, what they open with, their rounding, their plots and their errors."""

from __future__ import annotations

import json
import shutil

import pytest

from edgetune.cli import main
from edgetune.report import federated, single
from edgetune.report.run_info import load_run
from edgetune.runs import RunDir
from edgetune.train.config import RECIPE_LR


def test_finetune_report_opens_with_what_was_run_and_rounds_its_numbers(
    finetune_run, report, md_table
):
    text = report(finetune_run)
    rows = RunDir(finetune_run, resume=True).read_metrics()
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert text.startswith("# stories260K on sst2: MeZO (zeroth-order), lora\n")
    head = text.split("## Results")[0]
    for bullet in (
        "- **command**: `edgetune finetune` (status: done)",
        "- **data**: sst2 (64 training examples, 16 held-out), at most 32 tokens per example",
        "- **task**: classification",
        "- **adapter**: lora (rank 8, alpha 16.0)",
        "- **method**: MeZO (zeroth-order)",
        f"- **steps**: 4 of batch 4, learning rate {RECIPE_LR:g}, evaluated every 2",
        "- **seed**: 0",
    ):
        assert bullet in head
    table = md_table(text, "| metric |")
    assert table[0] == ["metric", "step 0 (zero-shot)", "step 4 (last)"]
    assert table[2] == [
        "held-out accuracy",
        f"{evals[0]['eval/accuracy']:.3f}",
        f"{evals[-1]['eval/accuracy']:.3f}",
    ]
    every = md_table(text, "| step | training loss |")
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert [c[:2] for c in every[2:]] == [
        ["0", "-"],
        ["2", f"{loss[2]:.3f}"],
        ["4", f"{loss[4]:.3f}"],
    ]
    for name in ("train_loss_vs_steps.png", "eval_accuracy_vs_steps.png", "eval_loss_vs_steps.png"):
        assert f"]({name})" in text
        assert (finetune_run / name).read_bytes()[:4] == b"\x89PNG"


def test_finetune_figures_name_model_data_method_and_start_at_step_0(finetune_run):
    figs = single.figures(load_run(finetune_run))
    assert set(figs) == {
        "train_loss_vs_steps.png",
        "eval_accuracy_vs_steps.png",
        "eval_loss_vs_steps.png",
    }
    for fig in figs.values():
        ax = fig.axes[0]
        assert ax.get_title() == "stories260K on sst2: MeZO (zeroth-order), lora"
        assert ax.get_xlabel() == "step"
        assert all(float(t).is_integer() for t in ax.get_xticks())
    acc = figs["eval_accuracy_vs_steps.png"].axes[0]
    assert acc.get_ylabel() == "held-out accuracy"
    assert list(acc.lines[0].get_xdata()) == [0, 2, 4]  # step 0: the zero-shot evaluation
    train = figs["train_loss_vs_steps.png"].axes[0]
    assert train.get_ylabel() == "training loss (nats)" and list(train.lines[0].get_xdata()) == [
        1,
        2,
        3,
        4,
    ]


def test_eval_run_report_is_one_column_without_plots(eval_run, report, md_table):
    text = report(eval_run)
    value = json.loads((eval_run / "summary.json").read_text())["eval/accuracy"]
    assert text.startswith("# stories260K on sst2: evaluation, zero-shot\n")
    assert "- **adapter evaluated**: none (zero-shot)" in text
    assert md_table(text, "| metric |")[2] == ["held-out accuracy", f"{value:.3f}"]
    assert "![" not in text and not list(eval_run.glob("*.png"))


def test_federated_report_says_what_ran_and_labels_memory_honestly(federate_run, report, md_table):
    text = report(federate_run)
    assert text.startswith(
        "# stories260K on sst2: fedit, lora, the cheapest method that fits each device\n"
    )
    head = text.split("## Results")[0]
    assert (
        "- **clients**: 5, 60% of them asked per round; partition dirichlet:0.5; fleet mixed"
        in head
    )
    assert "- **rounds**: 2 of 3 local steps, batch 4" in head
    assert "- **algorithm**: fedit (aggregator mean" in head
    methods = json.loads((federate_run / "summary.json").read_text())["methods"]
    assert (
        "methods the devices ran: " + ", ".join(f"{m} on {n} clients" for m, n in methods.items())
        in head
    )
    rows = RunDir(federate_run, resume=True).read_metrics()
    rounds = md_table(text, "| round |")
    assert [r[0] for r in rounds[2:]] == ["0", "1", "2"]  # round 0: the zero-shot evaluation
    assert rounds[3][2] == f"{rows[1]['eval/accuracy']:.3f}"
    assert rounds[3][3] == f"{rows[1]['bytes_up']:,}"
    devices = md_table(text, "| device |")
    assert devices[0][-2:] == [
        "memory estimate per device (MB)",
        "simulator process peak RSS during the client's work (MB)",
    ]
    clients = RunDir(federate_run, resume=True).read_metrics("clients.jsonl")
    for row in devices[2:]:
        mine = [c for c in clients if c["device"] == row[0]]
        assert row[-2] == f"{max(c['memory_mb'] for c in mine):,.0f}"
        assert row[1] == ", ".join(sorted({c["method"] for c in mine}))
    assert "not a device's memory" in text


def test_federated_figures_from_round_0_with_worded_axes(federate_run):
    run = load_run(federate_run)
    figs = federated.figures(run, federated.round_rows(run), "eval/accuracy")
    labels = {name: (f.axes[0].get_xlabel(), f.axes[0].get_ylabel()) for name, f in figs.items()}
    assert labels == {
        "metric_vs_rounds.png": ("round", "held-out accuracy"),
        "metric_vs_time.png": ("cumulative simulated time (s)", "held-out accuracy"),
        "metric_vs_bytes.png": ("cumulative bytes uploaded (log scale)", "held-out accuracy"),
    }
    title = "stories260K on sst2: fedit, lora, the cheapest method that fits each device"
    assert {f.axes[0].get_title() for f in figs.values()} == {title}
    by_round = figs["metric_vs_rounds.png"].axes[0]
    low, high = by_round.get_xlim()
    assert [t for t in by_round.get_xticks() if low <= t <= high] == [0, 1, 2]
    for fig in figs.values():
        assert fig.axes[0].lines[0].get_xdata()[0] == 0  # round 0 at 0 s and 0 bytes


def test_unfinished_run_is_reported_from_its_lines(finetune_run, tmp_path, report):
    run = tmp_path / "killed"
    shutil.copytree(finetune_run, run)
    (run / "summary.json").unlink()
    text = report(run)
    assert "(status: unfinished, no summary.json yet)" in text
    assert "The run has not finished" in text


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "is a file"),
        (lambda p: p, "has no config.yaml and no metrics.jsonl"),
    ],
)
def test_a_path_that_is_no_run_directory_exits_2_with_the_fix(tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "pass the --out folder" in err and "Traceback" not in err


def test_a_torn_last_line_is_dropped_and_a_damaged_one_before_it_exits_2(
    finetune_run, tmp_path, capsys
):
    run = tmp_path / "damaged"
    shutil.copytree(finetune_run, run)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "lo')
    assert main(["report", str(run)]) == 0  # what a killed append leaves: warned, dropped
    assert "dropped its last line (line 8" in capsys.readouterr().err
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('\n{"step": 6, "loss": 1.0}\n')
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl line 8 is damaged" in err and "Traceback" not in err


def test_on_flower_the_measured_memory_is_the_node_process(federate_run):
    clients = RunDir(federate_run, resume=True).read_metrics("clients.jsonl")
    lost = [{**clients[0], "status": "no reply: timed out", "bytes_up": 0}]
    header, _, *rows = federated.device_table(clients + lost, "flower run")
    assert header.endswith(
        "| memory estimate per device (MB) | node process peak RSS (MB, measured) |"
    )
    row = next(r for r in rows if r.startswith(f"| {clients[0]['device']} |"))
    assert row.strip("|").split("|")[6].strip() == "1"  # the lost reply is counted as lost
