"""`edgetune report DIR`: a Markdown report of a federated run with PNG plots.

Plots: held-out metric against rounds, against simulated seconds and against cumulative
uploaded bytes. Table: per device class, the clients' methods, rounds taken part, bytes
up/down and simulated seconds, and what happened to the others (unavailable, dropped,
late, rejected).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from edgetune.errors import EdgetuneError
from edgetune.report.plots import plot_metric
from edgetune.runs import RunDir


def _metric_key(rows: list[dict[str, Any]]) -> str:
    for key in ("eval/accuracy", "eval/rougeL", "eval/perplexity", "eval/loss"):
        if any(key in r for r in rows):
            return key
    raise EdgetuneError("the run has no evaluation lines (eval/*) to plot")


def device_table(clients: list[dict[str, Any]]) -> list[str]:
    """Markdown rows summarising clients.jsonl per device class."""
    groups: dict[str, dict[str, Any]] = defaultdict(lambda: defaultdict(float))
    for c in clients:
        g = groups[c["device"]]
        g["methods"] = g.get("methods") or set()
        if c.get("method"):
            g["methods"].add(c["method"] + (f" r{c['rank']}" if c.get("rank") else ""))
        peak = c.get("peak_rss_mb")
        if isinstance(peak, (int, float)) and peak == peak:
            g["peak"] = max(g["peak"], peak)
        status = c["status"].split(":")[0]
        if status.startswith(("no reply", "error", "no node")):
            status = "lost"  # a real node that did not answer (Flower runs)
        g[status] += 1
        g["bytes_up"] += c.get("bytes_up", 0)
        g["bytes_down"] += c.get("bytes_down", 0)
        g["sim_s"] += c.get("sim_s", 0.0) if status == "ok" else 0.0
    lines = [
        "| device | methods | ok | unavailable | dropped | late | lost | rejected | bytes up | "
        "bytes down | simulated s (ok) | peak RSS MB (measured) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for device, g in sorted(groups.items()):
        lines.append(
            f"| {device} | {', '.join(sorted(g['methods'])) or '-'} | {g['ok']:.0f} | "
            f"{g['unavailable']:.0f} | {g['dropped mid-round']:.0f} | "
            f"{g['missed the deadline']:.0f} | {g['lost']:.0f} | {g['rejected']:.0f} | "
            f"{g['bytes_up']:,.0f} | "
            f"{g['bytes_down']:,.0f} | {g['sim_s']:.1f} | {g['peak'] or '-'} |"
        )
    return lines


def render(run_dir: str | Path) -> Path:
    """Write DIR/report.md and its plots; returns the report path."""
    if not (Path(run_dir) / "metrics.jsonl").exists():
        raise EdgetuneError(
            f"{run_dir} is not a run directory (no metrics.jsonl); pass the --out of an "
            "`edgetune federate` run"
        )
    run = RunDir(run_dir, resume=True)
    rows = [r for r in run.read_metrics() if "round" in r]
    if not rows:
        raise EdgetuneError(f"{run.path} has no federated rounds in metrics.jsonl")
    key = _metric_key(rows)
    up = 0.0
    for r in rows:
        up = r.get("total_bytes_up", up)
        r["total_bytes_up"] = up
        r.setdefault("total_sim_s", 0.0)
    name = run.read_config().get("fed", {}).get("algorithm", "run")
    plots = {
        "rounds": plot_metric({name: rows}, key, run.path / "metric_vs_rounds.png", x="round"),
        "time": plot_metric({name: rows}, key, run.path / "metric_vs_time.png", x="total_sim_s"),
        "bytes": plot_metric(
            {name: rows}, key, run.path / "metric_vs_bytes.png", x="total_bytes_up", logx=True
        ),
    }
    last = rows[-1]
    lines = [
        f"# Federated run: {name}",
        "",
        f"Rounds: {last['round']}; final {key}: {last.get(key, float('nan')):.4f} "
        f"(start {rows[0].get(key, float('nan')):.4f}); uploaded {last['total_bytes_up']:,.0f} "
        f"bytes; simulated time {last['total_sim_s']:.1f} s.",
        "",
        "| round | loss | "
        + key
        + " | bytes up | bytes down | simulated s | accepted | rejected |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows[1:]:
        lines.append(
            f"| {r['round']} | {r.get('loss', '')} | {r.get(key, float('nan')):.4f} | "
            f"{r.get('bytes_up', 0):,} | {r.get('bytes_down', 0):,} | "
            f"{r.get('sim_s', 0.0):.1f} | {r.get('accepted', 0)} | {r.get('rejected', 0)} |"
        )
    lines += ["", "## Devices", "", *device_table(run.read_metrics("clients.jsonl")), ""]
    lines += [f"![{k}]({p.name})" for k, p in plots.items()]
    out = run.path / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
