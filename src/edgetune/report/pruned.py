"""What a report adds for a federation whose devices train pruned sub-models (FedSpine).

Such a run's devices train nested pruned sub-models: each round a planner picks an arm
(pruning level, LoRA rank) for every asked client, and the global model is evaluated at
the scheduled sparsity (clients.jsonl entries carry `ratio`, metrics.jsonl `sparsity`). The report shows those choices (the arm plot), the sparsity and
sub-model size by round, the mean ratio each device class trained at, and what each
class deploys at the end (summary.json `classes`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgetune.report import numbers
from edgetune.report.plots import METRIC_LABELS, arm_figure, axis_label
from edgetune.report.run_info import RunRecord, plot_title

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Columns every deployed class has, in this order; any further numeric key follows.
DEPLOYED_COLUMNS = {
    "devices": "devices",
    "arm": "arm",
    "ratio": "pruning ratio",
    "rank": "rank",
    "params": "params",
}


def trains_pruned(run: RunRecord) -> bool:
    """Whether the run's devices trained pruned sub-models (its logs say so)."""
    return any("sparsity" in r for r in run.metrics) or any("ratio" in c for c in run.clients)


def figures(run: RunRecord, rows: list[dict[str, Any]]) -> dict[str, Figure]:
    """The arm plot by file name (see `plots.arm_figure`)."""
    return {"arm_choices.png": arm_figure(run.clients, rows, title=plot_title(run))}


def mean_ratios(clients: list[dict[str, Any]]) -> dict[str, float]:
    """Device class -> the mean pruning ratio its clients trained at (status ok only)."""
    seen: dict[str, list[float]] = {}
    for c in clients:
        ratio = c.get("ratio")
        if c.get("status") == "ok" and isinstance(ratio, (int, float)):
            seen.setdefault(c["device"], []).append(float(ratio))
    return {device: sum(r) / len(r) for device, r in seen.items()}


def _cell(key: str, value: Any) -> str:
    if value is None:
        return numbers.MISSING
    if key in ("devices", "params", "rank"):
        return numbers.count(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return numbers.metric(value) if isinstance(value, float) else numbers.count(value)
    return str(value)


def deployed_table(classes: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown: one row per device class from summary.json `classes`.

    Columns: class, devices, arm, ratio, rank, params, then every further numeric key
    any class has (e.g. `eval/accuracy`, `tokens_per_s`), named in words; a class that
    lacks one shows a dash.

    Args:
        classes: device class -> what it deploys ({"arm": "1.5x r8", "ratio": 0.45, ...}).
    """
    extra = sorted(
        {
            key
            for deployed in classes.values()
            for key, value in deployed.items()
            if key not in DEPLOYED_COLUMNS
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        }
    )
    names = [*DEPLOYED_COLUMNS, *extra]
    header = [
        "device class",
        *(DEPLOYED_COLUMNS.get(k) or METRIC_LABELS.get(k) or axis_label(k) for k in names),
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|" + "|".join("---" if k == "arm" else "---:" for k in names) + "|",
    ]
    for device, deployed in sorted(classes.items()):
        cells = [_cell(k, deployed.get(k)) for k in names]
        lines.append(f"| {device} | " + " | ".join(cells) + " |")
    return lines


def section(run: RunRecord) -> list[str]:
    """The report's "Deployed per device class" section (Markdown lines)."""
    lines = ["## Deployed per device class", ""]
    classes = run.summary.get("classes")
    if not isinstance(classes, dict) or not classes:
        return [*lines, "Not recorded yet: summary.json names the classes when the run ends.", ""]
    return [
        *lines,
        "What each device class runs after the last round: the arm its bandit settled on "
        "(pruning level x target, LoRA rank), the share of units pruned and the parameter "
        "count of that sub-model.",
        "",
        *deployed_table(classes),
        "",
    ]
