"""The report of a federated run (`edgetune federate`, `edgetune flower run`).

Opens with what was run (model, data, clients, partition, fleet, algorithm, methods),
then the held-out metric by round from round 0 (zero-shot) on, and a table per device
class: the clients' methods, rounds taken part, bytes up/down, simulated seconds, what
happened to the others (unavailable, dropped, late, lost, rejected) and memory. Plots:
held-out metric against rounds, simulated seconds and cumulative uploaded bytes.
A FedSpine run adds its sparsity and sub-model size by round, the mean pruning ratio per
device class, the arm plot and what each class deploys (see pruned.py).

Memory, honestly labelled: `memory_mb` is the per-device estimate the method choice
uses. In the simulator every client trains inside one process, so the measured
`peak_rss_mb` is that process's peak while the client worked (the whole model plus the
method), not a device's memory; on Flower it is the node process's own peak.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetune.errors import EdgetuneError
from edgetune.report import numbers, pruned
from edgetune.report.plots import METRIC_LABELS, metric_figure, resume_positions, save_all
from edgetune.report.run_info import (
    RunRecord,
    load_run,
    plot_title,
    resumed_at,
    wall_time,
    what_was_run,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MEASURED_MEMORY = {
    "federate": "simulator process peak RSS during the client's work (MB)",
    "flower run": "node process peak RSS (MB, measured)",
}


def _metric_key(rows: list[dict[str, Any]]) -> str:
    for key in ("eval/accuracy", "eval/rougeL", "eval/perplexity", "eval/loss"):
        if any(key in r for r in rows):
            return key
    raise EdgetuneError(
        "the run has no evaluation lines (eval/*) to report; rerun it with data.eval_size > 0"
    )


def _status(raw: str) -> str:
    status = raw.split(":")[0]
    if status.startswith(("no reply", "error", "no node")):
        return "lost"  # a real node that did not answer (Flower runs)
    return status


def device_table(
    clients: list[dict[str, Any]],
    command: str = "federate",
    ratios: dict[str, float] | None = None,
) -> list[str]:
    """Markdown rows summarising clients.jsonl per device class.

    Args:
        clients: clients.jsonl lines.
        command: "federate" (simulator) or "flower run": says what the measured memory is.
        ratios: device class -> mean pruning ratio trained at (FedSpine); adds a column.
    """
    groups: dict[str, dict[str, Any]] = defaultdict(lambda: defaultdict(float))
    for c in clients:
        g = groups[c["device"]]
        g["methods"] = g.get("methods") or set()
        if c.get("method"):
            g["methods"].add(c["method"] + (f" r{c['rank']}" if c.get("rank") else ""))
        for field, into in (("memory_mb", "estimate"), ("peak_rss_mb", "measured")):
            value = c.get(field)
            if isinstance(value, (int, float)) and value == value:
                g[into] = max(g[into], value)
        status = _status(c["status"])
        g[status] += 1
        g["bytes_up"] += c.get("bytes_up", 0)
        g["bytes_down"] += c.get("bytes_down", 0)
        g["sim_s"] += c.get("sim_s", 0.0) if status == "ok" else 0.0
    spine = ratios is not None
    lines = [
        "| device | methods | "
        + ("mean pruning ratio (ok) | " if spine else "")
        + "ok | unavailable | dropped | late | lost | rejected | bytes up | "
        "bytes down | simulated s (ok) | memory estimate per device (MB) | "
        f"{MEASURED_MEMORY.get(command, MEASURED_MEMORY['federate'])} |",
        "|---|---|" + ("---:|" if spine else "") + "---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        "---:|---:|",
    ]
    for device, g in sorted(groups.items()):
        ratio = f"{numbers.metric((ratios or {}).get(device))} | " if spine else ""
        lines.append(
            f"| {device} | {', '.join(sorted(g['methods'])) or '-'} | {ratio}{g['ok']:.0f} | "
            f"{g['unavailable']:.0f} | {g['dropped mid-round']:.0f} | "
            f"{g['missed the deadline']:.0f} | {g['lost']:.0f} | {g['rejected']:.0f} | "
            f"{numbers.count(g['bytes_up'])} | {numbers.count(g['bytes_down'])} | "
            f"{numbers.seconds(g['sim_s'])} | {numbers.megabytes(g['estimate'] or None)} | "
            f"{numbers.megabytes(g['measured'] or None)} |"
        )
    return lines


def cumulative(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """metrics.jsonl's round lines with cumulative bytes and seconds carried forward, so
    round 0 (zero-shot) sits at 0 bytes and 0 s on the plots."""
    rows, up, sim = [], 0.0, 0.0
    for r in metrics:
        if "round" in r:
            up, sim = r.get("total_bytes_up", up), r.get("total_sim_s", sim)
            rows.append({**r, "total_bytes_up": up, "total_sim_s": sim})
    return rows


def round_rows(run: RunRecord) -> list[dict[str, Any]]:
    """The run's round lines (see `cumulative`).

    Raises:
        EdgetuneError: the run logged no round yet.
    """
    rows = cumulative(run.metrics)
    if not rows:
        raise EdgetuneError(
            f"{run.path} has no federated rounds in metrics.jsonl; the run stopped before "
            f"its first evaluation: resume it with `edgetune federate --resume {run.path}`"
        )
    return rows


def figures(run: RunRecord, rows: list[dict[str, Any]], key: str) -> dict[str, Figure]:
    """The plots, by file name: `key` against rounds, simulated seconds and cumulative
    uploaded bytes (log scale), round 0 (zero-shot) included; for FedSpine also the arm
    plot (`arm_choices.png`)."""
    series, title = {str(run.config.get("fed", {}).get("algorithm")): rows}, plot_title(run)
    spine = pruned.figures(run, rows) if pruned.trains_pruned(run) else {}
    axes = {"rounds": "round", "time": "total_sim_s", "bytes": "total_bytes_up"}
    return {
        **{
            f"metric_vs_{name}.png": metric_figure(
                series,
                key,
                title=title,
                x=x,
                logx=x == "total_bytes_up",
                resumes=resume_positions(rows, run.resumes, x),
            )
            for name, x in axes.items()
        },
        **spine,
    }


def rounds_table(rows: list[dict[str, Any]], key: str, spine: bool = False) -> list[str]:
    """Markdown: one row per round, round 0 (zero-shot) first.

    Args:
        rows: the round lines (see `cumulative`).
        key: the held-out metric.
        spine: a FedSpine run: add the scheduled sparsity the global model was evaluated
            at and that sub-model's parameter count.
    """
    lines = [
        f"| round | training loss | {METRIC_LABELS[key]} | "
        + ("sparsity | evaluated params | " if spine else "")
        + "bytes up | bytes down | simulated s | accepted | rejected |",
        "|---:|---:|---:|" + ("---:|---:|" if spine else "") + "---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sub = (
            f"{numbers.metric(r.get('sparsity'))} | {numbers.count(r.get('params'))} | "
            if spine
            else ""
        )
        lines.append(
            f"| {r['round']} | {numbers.metric(r.get('loss'))} | {numbers.metric(r.get(key))} | "
            f"{sub}{numbers.count(r.get('bytes_up', 0))} | "
            f"{numbers.count(r.get('bytes_down', 0))} | "
            f"{numbers.seconds(r.get('sim_s', 0.0))} | {r.get('accepted', 0)} | "
            f"{r.get('rejected', 0)} |"
        )
    return lines


def write(run: RunRecord) -> Path:
    """Write RUN/report.md and its plots for a federated run; returns the report path."""
    rows = round_rows(run)
    key = _metric_key(rows)
    spine = pruned.trains_pruned(run)
    images = save_all(figures(run, rows, key), run.path)
    first, last = rows[0], rows[-1]
    measured = MEASURED_MEMORY.get(run.command, MEASURED_MEMORY["federate"])
    lines = [
        f"# {plot_title(run)}",
        "",
        "## What was run",
        "",
        *what_was_run(run),
        "",
        "## Results",
        "",
        f"{METRIC_LABELS[key]}: {numbers.metric(last.get(key))} after round {last['round']} "
        f"(round {first['round']}: {numbers.metric(first.get(key))}); uploaded "
        f"{numbers.size(last['total_bytes_up'])} in all; simulated time "
        f"{numbers.seconds(last['total_sim_s'])} s; {wall_time(run)}.",
        *(["", resumed_at(run)] if run.resumes else []),
        "",
        *rounds_table(rows, key, spine),
        "",
        "## Devices",
        "",
        *device_table(run.clients, run.command, pruned.mean_ratios(run.clients) if spine else None),
        "",
        f"Memory: the estimate is what the method choice assumes a device needs; the "
        f"{measured.split(' (')[0]} is measured"
        + (
            ", one process for every simulated client (whole model included), so it is not "
            "a device's memory."
            if run.command == "federate"
            else "."
        ),
        "",
        *(pruned.section(run) if spine else []),
        *images,
    ]
    out = run.path / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def render(run_dir: str | Path) -> Path:
    """Read the run in `run_dir` and write its report (see `write`)."""
    return write(load_run(run_dir))
