"""PNG plots of run metrics (matplotlib with the non-interactive Agg backend).

Every plot has a title (model, data, method), axis labels in words with units, and
integer ticks on round and step axes. FedSpine runs add a plot of the pruning ratio each
client trained at (`arm_figure`).

Plots that do not mislead (issue 30):
- the y axis never zooms into noise: accuracy and ROUGE-L sit on [0, 1], a loss (nats)
  starts at 0 and a perplexity at 1, its floor, so a move from 10.28 to 10.34 looks as
  small as it is;
- evaluations are drawn as markers at the steps or rounds where they ran, joined by a
  thin dotted line that reads as "not measured in between"; a per-step series (training
  loss) is a solid line, with markers on its points while they are few enough to see;
- the bytes axis says the bytes are cumulative and is logarithmic with limits that fit the
  data: linear from 0 (round 0, the zero-shot evaluation, uploaded nothing) up to the
  decade below the first upload, logarithmic after it (symlog), ending just past the
  largest value;
- each `--resume` is a vertical dashed line where the run continued.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

AXIS_LABELS = {
    "round": "round",
    "step": "step",
    "total_sim_s": "cumulative simulated time (s)",
    "total_bytes_up": "cumulative bytes uploaded (log scale)",
    "train_s": "training time (s)",
    "ratio": "pruning ratio (share of units pruned)",
    "sparsity": "scheduled sparsity",
}
METRIC_LABELS = {
    "eval/accuracy": "held-out accuracy",
    "eval/loss": "held-out loss (nats)",
    "eval/perplexity": "held-out perplexity (e^loss per token)",
    "eval/rougeL": "held-out ROUGE-L",
    "loss": "training loss (nats)",
}
INTEGER_AXES = ("round", "step")
UNIT_INTERVAL = ("accuracy", "acc", "acc_norm", "rougeL")  # last name part of a [0, 1] metric
FLOORS = {"loss": 0.0, "perplexity": 1.0}  # the smallest value a metric can take
DENSE_MARKERS = 60  # a per-step line shows markers on its points up to this many
RESUME_STYLE = {"color": "0.35", "linestyle": "--", "linewidth": 1.0}
LOG_MARGIN = 1.25  # a log axis ends this factor past its largest value


def axis_label(key: str) -> str:
    """`key` (a metrics.jsonl field) in words, with its unit."""
    return AXIS_LABELS.get(key) or METRIC_LABELS.get(key) or key.replace("/", " ").replace("_", " ")


def y_range(key: str) -> tuple[float | None, float | None]:
    """The y limits a metric is drawn on: (0, 1) for a share, (floor, None = fit the
    data) for a loss or perplexity, (None, None) for anything else."""
    name = key.rsplit("/", 1)[-1]
    if name in UNIT_INTERVAL:
        return 0.0, 1.0
    return FLOORS.get(name), None


def _log_axis_from_zero(ax: Any, positive: list[float]) -> None:
    """Log scale from the decade below the smallest value, linear below it, so x = 0
    stays on the axis; the axis ends just past the largest value (`LOG_MARGIN`)."""
    if not positive:
        return
    low = math.floor(math.log10(min(positive)))
    ax.set_xscale("symlog", linthresh=10.0**low, linscale=0.5)
    ax.set_xlim(0.0, max(positive) * LOG_MARGIN)


def _draw(ax: Any, xs: tuple, ys: tuple, key: str, label: str) -> None:
    """One series: evaluations as markers on a dotted line, a per-step series as a solid
    line (markers on its points while they are few)."""
    if key.startswith("eval/"):
        style = {"marker": "o", "markersize": 5, "linestyle": ":", "linewidth": 1.0}
    else:
        style = {"marker": "o" if len(xs) <= DENSE_MARKERS else "", "markersize": 3}
    ax.plot(xs, ys, label=label, clip_on=False, **style)


def resume_positions(
    rows: list[dict[str, Any]], resumes: list[dict[str, Any]], x: str
) -> list[float]:
    """Where each resume falls on the x axis `x`: its `step` or `round`, or on another
    axis (time, bytes) the `x` of the line logged at that step or round."""
    out = []
    for resume in resumes:
        unit = "step" if "step" in resume else "round"
        if x == unit:
            out.append(float(resume[unit]))
            continue
        at = [r[x] for r in rows if r.get(unit) == resume.get(unit) and x in r]
        out += [float(at[0])] if at else []
    return out


def _mark_resumes(ax: Any, positions: list[float]) -> None:
    for i, position in enumerate(sorted(set(positions))):
        ax.axvline(position, label="resumed (--resume)" if i == 0 else None, **RESUME_STYLE)


def metric_figure(
    series: dict[str, list[dict[str, Any]]],
    key: str,
    *,
    title: str,
    x: str = "step",
    logx: bool = False,
    resumes: Sequence[float] = (),
) -> Figure:
    """A figure of `key` against `x` for several runs, one series each (not saved).

    Args:
        series: run label -> its metrics.jsonl rows.
        key: the metric, e.g. "eval/accuracy".
        title: model, data and method.
        x: the x-axis field ("round", "step", "total_sim_s", "total_bytes_up", ...).
        logx: log-scale x axis for sizes; x = 0 (round 0) stays on the axis.
        resumes: x positions where the run was resumed (`resume_positions`), marked.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    ax = fig.add_subplot()
    positive: list[float] = []
    for label, rows in series.items():
        points = [(r[x], r[key]) for r in rows if _finite(r.get(key)) and x in r]
        if points:
            xs, ys = zip(*points, strict=True)
            _draw(ax, xs, ys, key, label)
            positive += [v for v in xs if v > 0]
    _mark_resumes(ax, list(resumes))
    if logx:
        _log_axis_from_zero(ax, positive)
    if x in INTEGER_AXES:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom, top = y_range(key)
    ax.set_ylim(bottom=bottom, top=top)
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(key))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) > 1 or resumes:
        ax.legend()
    fig.tight_layout()
    return fig


def _finite(value: Any) -> bool:
    """A plottable number (metrics.jsonl writes a non-finite value as a string)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG (creating its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def caption(fig: Figure) -> str:
    """What a figure shows, from its axis labels: "held-out accuracy against round"."""
    ax = fig.axes[0]
    return f"{ax.get_ylabel()} against {ax.get_xlabel()}"


def save_all(figures: dict[str, Figure], folder: Path) -> list[str]:
    """Write each figure as `folder/<file name>`; returns Markdown image lines."""
    return [f"![{caption(fig)}]({save(fig, folder / name).name})" for name, fig in figures.items()]


def plot_metric(
    series: dict[str, list[dict[str, Any]]],
    key: str,
    path: str | Path,
    *,
    title: str,
    x: str = "step",
    logx: bool = False,
) -> Path:
    """Plot `key` against `x` for several runs into the PNG `path` (see `metric_figure`)."""
    return save(metric_figure(series, key, title=title, x=x, logx=logx), path)


RANK_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _spread(entries: list[dict[str, Any]], classes: list[str]) -> list[float]:
    """x positions: each device class gets its own slot around the round, and the
    entries of one class in one round fan out inside it, so equal ratios stay countable."""
    slot = 0.6 / len(classes)
    seen: dict[tuple[Any, str], int] = {}
    xs = []
    for c in entries:
        k = seen[(c["round"], c["device"])] = seen.get((c["round"], c["device"]), -1) + 1
        i = classes.index(c["device"])
        xs.append(c["round"] - 0.3 + slot * i + slot * (0.5 + 0.15 * k))
    return xs


def arm_figure(clients: list[dict[str, Any]], rows: list[dict[str, Any]], *, title: str) -> Figure:
    """FedSpine's arm choices (not saved): the pruning ratio each client trained at, by round.

    One marker per clients.jsonl entry that has a ratio: color per device class, shape per
    LoRA rank, filled if the client trained (status ok), hollow if it was asked but did
    not finish (unavailable, dropped, late, rejected). A dashed line is the scheduled
    sparsity the global model was evaluated at (metrics.jsonl `sparsity`).

    Args:
        clients: clients.jsonl lines (entries without a `ratio` are left out).
        rows: metrics.jsonl round lines.
        title: model, data and method.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    ax = fig.add_subplot()
    entries = [c for c in clients if isinstance(c.get("ratio"), (int, float)) and "round" in c]
    classes = sorted({c["device"] for c in entries})
    ranks = sorted({c.get("rank") or 0 for c in entries})
    xs = _spread(entries, classes) if entries else []
    for x, c in zip(xs, entries, strict=True):
        color = f"C{classes.index(c['device']) % 10}"
        ax.plot(
            [x],
            [c["ratio"]],
            linestyle="none",
            marker=RANK_MARKERS[ranks.index(c.get("rank") or 0) % len(RANK_MARKERS)],
            markersize=7,
            markeredgecolor=color,
            markerfacecolor=color if c.get("status") == "ok" else "none",
        )
    schedule = [(r["round"], r["sparsity"]) for r in rows if "sparsity" in r and "round" in r]
    handles = []
    if schedule:
        sx, sy = zip(*schedule, strict=True)
        (line,) = ax.plot(sx, sy, color="black", linestyle="--", label="scheduled sparsity")
        handles.append(line)
    handles += [
        Line2D([], [], linestyle="none", marker="o", color=f"C{i % 10}", label=name)
        for i, name in enumerate(classes)
    ]
    handles += [
        Line2D(
            [],
            [],
            linestyle="none",
            marker=RANK_MARKERS[i % len(RANK_MARKERS)],
            color="gray",
            label=f"rank {rank}" if rank else "rank ?",
        )
        for i, rank in enumerate(ranks)
    ]
    if entries and any(c.get("status") != "ok" for c in entries):
        handles.append(
            Line2D(
                [],
                [],
                linestyle="none",
                marker="o",
                color="gray",
                markerfacecolor="none",
                label="asked, did not train",
            )
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(axis_label("round"))
    ax.set_ylabel(axis_label("ratio"))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    return fig
