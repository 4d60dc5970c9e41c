"""PNG plots of run metrics (matplotlib with the non-interactive Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_metric(
    series: dict[str, list[dict[str, Any]]],
    key: str,
    path: str | Path,
    x: str = "step",
    title: str | None = None,
    logx: bool = False,
) -> Path:
    """Plot `key` against `x` for several runs, one line each.

    Args:
        series: run label -> its metrics.jsonl rows.
        key: the metric, e.g. "eval/accuracy".
        path: the PNG to write.
        x: the x-axis field.
        title: plot title.
        logx: log-scale x axis (points with x <= 0 are left out), e.g. for bytes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, rows in series.items():
        points = [(r[x], r[key]) for r in rows if key in r and x in r]
        if logx:
            points = [(px, py) for px, py in points if px > 0]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
