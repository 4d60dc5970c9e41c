"""Plots that do not mislead (issue 30), read on the matplotlib Figure objects: shares on
[0, 1], losses from 0 in nats, perplexity from 1, evaluations as markers at the points
evaluated, cumulative bytes on a log axis that fits the data, resumes marked."""

from __future__ import annotations

from pathlib import Path

import matplotlib.colors as mcolors
import pytest

from edgetune.report import federated
from edgetune.report.plots import LOG_MARGIN, metric_figure, resume_positions
from edgetune.report.run_info import RunRecord

EVALS = [
    {"step": 0, "eval/accuracy": 0.40, "eval/perplexity": 10.341, "eval/loss": 2.336},
    {"step": 50, "eval/accuracy": 0.55, "eval/perplexity": 10.300, "eval/loss": 2.332},
    {"step": 100, "eval/accuracy": 0.61, "eval/perplexity": 10.277, "eval/loss": 2.330},
]
ROUNDS = [
    {"round": 0, "eval/accuracy": 0.375, "total_bytes_up": 0, "total_sim_s": 0.0},
    {"round": 1, "eval/accuracy": 0.5, "total_bytes_up": 380_000, "total_sim_s": 0.2},
    {"round": 2, "eval/accuracy": 0.625, "total_bytes_up": 740_000, "total_sim_s": 0.4},
    {"round": 3, "eval/accuracy": 0.6875, "total_bytes_up": 1_100_000, "total_sim_s": 0.6},
]


@pytest.mark.parametrize("key", ["eval/accuracy", "eval/rougeL", "eval/acc_norm"])
def test_shares_are_pinned_to_0_1_whatever_the_data(key):
    rows = [{"step": s, key: v} for s, v in ((0, 0.61), (10, 0.62), (20, 0.615))]
    ax = metric_figure({"run": rows}, key, title="t").axes[0]
    assert ax.get_ylim() == (0.0, 1.0)


def test_a_small_perplexity_move_stays_small():
    ax = metric_figure({"run": EVALS}, "eval/perplexity", title="t").axes[0]
    bottom, top = ax.get_ylim()
    assert bottom == 1.0 and top >= 10.341  # perplexity's floor, not a zoom on the data
    assert (10.341 - 10.277) / (top - bottom) < 0.01  # under 1 % of the axis height
    assert "per token" in ax.get_ylabel()


@pytest.mark.parametrize(("key", "label"), [("loss", "training loss (nats)"), ("eval/loss", "held-out loss (nats)")])  # fmt: skip
def test_losses_start_at_zero_and_say_nats(key, label):
    rows = [{"step": s, "loss": 2.3 - s / 1000} for s in range(1, 5)] if key == "loss" else EVALS
    ax = metric_figure({"run": rows}, key, title="t").axes[0]
    assert ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] >= max(r[key] for r in rows)
    assert ax.get_ylabel() == label


def test_evaluations_are_markers_at_the_evaluated_steps_on_a_dotted_line():
    (line,) = metric_figure({"held-out": EVALS}, "eval/accuracy", title="t").axes[0].lines
    assert list(line.get_xdata()) == [0, 50, 100]  # nothing drawn as if measured between
    assert line.get_marker() == "o" and line.get_markersize() >= 5
    assert line.get_linestyle() == ":"


def test_a_per_step_line_has_markers_on_its_points_only_while_they_are_few():
    few = [{"step": s, "loss": 1.0} for s in range(1, 21)]
    many = [{"step": s, "loss": 1.0} for s in range(1, 201)]
    (short,) = metric_figure({"t": few}, "loss", title="t").axes[0].lines
    (long,) = metric_figure({"t": many}, "loss", title="t").axes[0].lines
    assert short.get_linestyle() == "-" and short.get_marker() == "o"
    assert long.get_linestyle() == "-" and long.get_marker() in ("", "None", None)


def test_cumulative_bytes_on_a_log_axis_that_fits_the_data():
    ax = metric_figure(
        {"fedit": ROUNDS}, "eval/accuracy", title="t", x="total_bytes_up", logx=True
    ).axes[0]
    low, high = ax.get_xlim()
    assert ax.get_xscale() == "symlog" and ax.get_xlabel().startswith("cumulative bytes")
    assert low == 0.0  # round 0 (nothing uploaded yet) stays on the axis
    assert 1_100_000 < high <= 1_100_000 * LOG_MARGIN  # not the next power of ten (10^7)


def test_resumes_are_dashed_vertical_lines_at_the_step_continued_from():
    ax = metric_figure({"held-out": EVALS}, "eval/accuracy", title="t", resumes=[50]).axes[0]
    marks = [line for line in ax.lines if line.get_label() == "resumed (--resume)"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [50, 50]
    assert marks[0].get_linestyle() == "--"
    assert "resumed (--resume)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_a_resumed_round_is_marked_on_the_round_time_and_bytes_axes():
    resumes = [{"round": 2, "dropped": [], "changed": {}, "wall_s_before": 3.0}]
    assert resume_positions(ROUNDS, resumes, "round") == [2.0]
    assert resume_positions(ROUNDS, resumes, "total_bytes_up") == [740_000.0]
    run = RunRecord(
        path=Path("."),
        command="federate",
        config={"fed": {"algorithm": "fedit"}, "model": "m", "data": {"dataset": "d"}},
        summary={},
        metrics=ROUNDS,
        resumes=resumes,
    )

    figs = federated.figures(run, ROUNDS, "eval/accuracy")

    for name, x in (("rounds", 2), ("time", 0.4), ("bytes", 740_000)):
        ax = figs[f"metric_vs_{name}.png"].axes[0]
        (mark,) = [line for line in ax.lines if line.get_label() == "resumed (--resume)"]
        assert list(mark.get_xdata()) == [x, x], name
        assert mcolors.to_hex(mark.get_color()) == mcolors.to_hex("0.35")
