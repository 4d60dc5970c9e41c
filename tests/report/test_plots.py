"""Plots read on their own: title, axis labels in words with units, integer round
ticks, round 0 kept (inspected on the matplotlib figure, not on pixels)."""

from __future__ import annotations

from edgetune.report.plots import metric_figure

ROWS = [
    {"round": 0, "eval/accuracy": 0.375, "total_bytes_up": 0, "total_sim_s": 0.0},
    {"round": 1, "eval/accuracy": 0.5, "total_bytes_up": 573352, "total_sim_s": 0.19},
    {"round": 2, "eval/accuracy": 0.625, "total_bytes_up": 764470, "total_sim_s": 0.23},
    {"round": 3, "eval/accuracy": 0.6875, "total_bytes_up": 955588, "total_sim_s": 0.27},
]


def test_round_axis_has_integer_ticks_from_round_0_and_worded_labels():
    fig = metric_figure({"fedit": ROWS}, "eval/accuracy", title="m on d: fedit", x="round")
    ax = fig.axes[0]
    assert ax.get_title() == "m on d: fedit"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("round", "held-out accuracy")
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks == [0, 1, 2, 3]
    assert list(ax.lines[0].get_xdata()) == [0, 1, 2, 3]


def test_bytes_axis_is_logarithmic_and_keeps_round_0_at_zero_bytes():
    fig = metric_figure({"fedit": ROWS}, "eval/accuracy", title="t", x="total_bytes_up", logx=True)
    ax = fig.axes[0]
    assert (
        ax.get_xscale() == "symlog" and ax.get_xlabel() == "cumulative bytes uploaded (log scale)"
    )
    assert list(ax.lines[0].get_xdata()) == [0, 573352, 764470, 955588]
    low, high = ax.get_xlim()
    assert low <= 0 and high >= 1e6  # the zero-shot point and a full decade are on the axis


def test_time_and_step_axes_name_their_units():
    time = metric_figure({"a": ROWS}, "eval/accuracy", title="t", x="total_sim_s").axes[0]
    assert time.get_xlabel() == "cumulative simulated time (s)"
    steps = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(1, 8)]
    ax = metric_figure({"training": steps}, "loss", title="t").axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "training loss (nats)")
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_one_line_needs_no_legend_several_get_one():
    assert metric_figure({"a": ROWS}, "eval/accuracy", title="t").axes[0].get_legend() is None
    both = metric_figure({"a": ROWS, "b": ROWS}, "eval/accuracy", title="t", x="round")
    assert [t.get_text() for t in both.axes[0].get_legend().get_texts()] == ["a", "b"]
