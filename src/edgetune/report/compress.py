"""The report of a compress run (`edgetune compress`): what each stage cost and kept.

One row per stage in the order it ran (before, after-prune, after-recover,
after-quantize): parameters, size on disk, prefill latency, decode speed and the held-out
metric (accuracy, else perplexity, else loss), from summary.json (an unfinished run has
only its metrics.jsonl stage lines: the metric columns, dashes elsewhere). Size on disk is
measured for the input model and the saved one (DIR/model) only; an intermediate stage
shows a dash rather than an estimate.

Two Pareto plots put each stage's metric against its decode speed and its size on disk:
a stage is Pareto-optimal (filled marker) when no other stage is at least as good on both
axes and better on one; the dominated ones are hollow. The x axes start at 0, so half
the size or twice the speed reads as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetune.report import numbers
from edgetune.report.plots import METRIC_LABELS, axis_label, save_all, y_range
from edgetune.report.run_info import RunRecord, plot_title, wall_time, what_was_run

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STAGES = ("before", "after-prune", "after-recover", "after-quantize")
# headline metric, and whether higher is better
METRICS = {
    "eval/accuracy": True,
    "eval/rougeL": True,
    "eval/perplexity": False,
    "eval/loss": False,
}
X_AXES = {  # Pareto plot file -> (Stage field, label, higher is better)
    "pareto_speed.png": ("decode_tokens_per_s", "decode speed (tokens/s)", True),
    "pareto_size.png": ("size_mb", "size on disk (MB, 1 MB = 10^6 bytes)", False),
}


@dataclass(frozen=True)
class Stage:
    """One compression stage as the report reads it (None = not measured)."""

    name: str
    metrics: dict[str, float]
    params: float | None = None
    size_mb: float | None = None
    prefill_ms: float | None = None
    decode_tokens_per_s: float | None = None


def stages(run: RunRecord) -> list[Stage]:
    """The stages the run went through, in order: from summary.json when the run
    finished, else from its metrics.jsonl stage lines."""
    logged = {r["stage"]: r for r in run.metrics if "stage" in r}
    s = run.summary
    finished = [n for n in STAGES if n in s]
    sizes = {"before": s.get("model_bytes_before")}
    if finished:  # DIR/model is the last stage's model
        sizes[finished[-1]] = s.get("model_bytes_after")
    out = []
    for name in [n for n in STAGES if n in s or n in logged]:
        saved = s.get(name) or {}
        line = logged.get(name, {})
        out.append(
            Stage(
                name,
                saved.get("metrics") or {k: v for k, v in line.items() if k.startswith("eval/")},
                params=s.get("params_before" if name == "before" else "params_after"),
                size_mb=_mb(sizes.get(name)),
                prefill_ms=saved.get("prefill_ms"),
                decode_tokens_per_s=saved.get("decode_tokens_per_s"),
            )
        )
    return out


def _mb(value: Any) -> float | None:
    return value / 1e6 if isinstance(value, int | float) and not isinstance(value, bool) else None


def headline(rows: list[Stage]) -> str | None:
    """The metric the stages are compared on: accuracy first, then the others."""
    return next((k for k in METRICS if any(k in r.metrics for r in rows)), None)


def stage_table(rows: list[Stage]) -> list[str]:
    """Markdown: one row per stage, every held-out metric any stage has."""
    keys = [k for k in METRICS if any(k in r.metrics for r in rows)]
    header = ["stage", "parameters", "size on disk (MB)", "prefill (ms)", "decode (tokens/s)"]
    lines = [
        "| " + " | ".join([*header, *(METRIC_LABELS[k] for k in keys)]) + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(keys),
    ]
    for r in rows:
        cells = [
            r.name,
            numbers.count(r.params),
            _size(r.size_mb),
            numbers.seconds(r.prefill_ms),
            numbers.seconds(r.decode_tokens_per_s),
            *(numbers.metric(r.metrics.get(k)) for k in keys),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _size(mb: float | None) -> str:
    return numbers.MISSING if mb is None else f"{mb:.3f}"


def pareto_optimal(points: list[tuple[float, float]], x_up: bool, y_up: bool) -> list[bool]:
    """For each (x, y): whether no other point is at least as good on both and better on
    one (`x_up` / `y_up`: higher is better on that axis)."""

    def better_or_equal(a: float, b: float, up: bool) -> bool:
        return a >= b if up else a <= b

    def dominates(p: tuple[float, float], q: tuple[float, float]) -> bool:
        at_least = better_or_equal(p[0], q[0], x_up) and better_or_equal(p[1], q[1], y_up)
        return at_least and p != q

    return [not any(dominates(p, q) for p in points) for q in points]


def pareto_figure(rows: list[Stage], key: str, x: str, *, title: str) -> Figure | None:
    """The stages' `key` against the Stage field `x` (a key of `X_AXES`' values), stage
    names beside the markers; None when fewer than two stages measured both."""
    from matplotlib.figure import Figure

    field, label, x_up = next(v for v in X_AXES.values() if v[0] == x)
    measured = _measured(rows, field, key)
    if len(measured) < 2:
        return None
    optimal = pareto_optimal([(px, py) for _, px, py in measured], x_up, METRICS[key])
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    ax = fig.add_subplot()
    for i, ((name, px, py), best) in enumerate(zip(measured, optimal, strict=True)):
        face = "C0" if best else "none"
        ax.plot([px], [py], marker="o", markersize=7, color="C0", markerfacecolor=face,
                linestyle="none", clip_on=False)  # fmt: skip
        ax.annotate(
            name, (px, py), textcoords="offset points", xytext=(6, 4 - 14 * (i % 2)), fontsize=8
        )
    ax.plot([], [], marker="o", color="C0", linestyle="none", label="Pareto-optimal")
    ax.plot([], [], marker="o", color="C0", markerfacecolor="none", linestyle="none",
            label="dominated")  # fmt: skip
    ax.set_xlim(left=0.0, right=max(px for _, px, _ in measured) * 1.15)
    ax.set_ylim(*y_range(key))
    ax.set_xlabel(label)
    ax.set_ylabel(axis_label(key))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _measured(rows: list[Stage], field: str, key: str) -> list[tuple[str, float, float]]:
    """(stage name, its `field`, its `key`) for the stages that measured both."""
    out = []
    for r in rows:
        px, py = getattr(r, field), r.metrics.get(key)
        if px is not None and py is not None:
            out.append((r.name, float(px), float(py)))
    return out


def figures(run: RunRecord, rows: list[Stage]) -> dict[str, Figure]:
    """The Pareto plots that have two measured stages, by file name."""
    key = headline(rows)
    if key is None:
        return {}
    made = {
        name: pareto_figure(rows, key, f, title=plot_title(run))
        for name, (f, _, _) in X_AXES.items()
    }
    return {name: fig for name, fig in made.items() if fig is not None}


def write(run: RunRecord) -> Path:
    """Write RUN/report.md and its plots for a compress run; returns the report path."""
    rows = stages(run)
    images = save_all(figures(run, rows), run.path)
    s = run.summary
    cost = (
        f"{wall_time(run)}; peak RSS of the process {numbers.megabytes(s.get('peak_rss_mb'))} MB."
        if s
        else "The run has not finished (no summary.json): the stages it logged so far."
    )
    lines = [
        f"# {plot_title(run)}",
        "",
        "## What was run",
        "",
        *what_was_run(run),
        "",
        "## Stages",
        "",
        *stage_table(rows),
        "",
        "Size on disk is measured for the input model and the saved one only (a dash "
        "between). Speed: prefill latency and greedy decode on this machine.",
        "",
        cost,
        "",
        *images,
    ]
    out = run.path / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
