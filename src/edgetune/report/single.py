"""The report of a single-device run (`edgetune finetune`, `edgetune eval --out`).

Opens with what was run, then the zero-shot and final figures side by side, the
evaluation at every step it ran, and plots: training loss against steps and each
held-out metric against steps (step 0 is the zero-shot evaluation). A curve with fewer
than two points (an `eval` run) is a table row, not a plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetune.report import numbers
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

EVAL_KEYS = ("eval/accuracy", "eval/rougeL", "eval/perplexity", "eval/loss")


def eval_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The held-out metrics the run logged, the headline one first."""
    return [k for k in EVAL_KEYS if any(k in r for r in rows)]


def figures(run: RunRecord) -> dict[str, Figure]:
    """The run's plots, by file name: training loss and each held-out metric against steps."""
    title = plot_title(run)
    train = [r for r in run.metrics if "loss" in r and "step" in r]
    marks = resume_positions(run.metrics, run.resumes, "step")
    out = {}
    if len(train) > 1:
        out["train_loss_vs_steps.png"] = metric_figure(
            {"training": train}, "loss", title=title, resumes=marks
        )
    for key in eval_keys(run.metrics):
        if sum(key in r for r in run.metrics) > 1:
            name = key.split("/")[1].lower()
            out[f"eval_{name}_vs_steps.png"] = metric_figure(
                {"held-out": run.metrics}, key, title=title, resumes=marks
            )
    return out


def results_table(run: RunRecord) -> list[str]:
    """Markdown: each held-out metric zero-shot (step 0) and at the last evaluation."""
    evals = [r for r in run.metrics if any(k in r for k in EVAL_KEYS)]
    if not evals:
        return ["No evaluation ran (data.eval_size=0 or the run stopped before one)."]
    first, last = evals[0], evals[-1]
    if len(evals) == 1:
        rows = [f"| {METRIC_LABELS[k]} | {numbers.metric(first[k])} |" for k in eval_keys(evals)]
        return [f"| metric | step {first.get('step', 0)} |", "|---|---:|", *rows]
    lines = [
        f"| metric | step {first.get('step', 0)}"
        + (" (zero-shot)" if first.get("step", 0) == 0 else "")
        + f" | step {last.get('step', 0)} (last) |",
        "|---|---:|---:|",
    ]
    for key in eval_keys(evals):
        lines.append(
            f"| {METRIC_LABELS[key]} | {numbers.metric(first.get(key))} | "
            f"{numbers.metric(last.get(key))} |"
        )
    return lines


def evaluations(run: RunRecord) -> list[str]:
    """Markdown: every evaluation with the training loss of the step it followed."""
    keys = eval_keys(run.metrics)
    loss = {r["step"]: r["loss"] for r in run.metrics if "loss" in r and "step" in r}
    lines = [
        "| step | training loss | " + " | ".join(METRIC_LABELS[k] for k in keys) + " |",
        "|---:|---:|" + "---:|" * len(keys),
    ]
    for r in run.metrics:
        if any(k in r for k in keys):
            cells = [numbers.metric(r.get(k)) for k in keys]
            step = r.get("step", 0)
            lines.append(f"| {step} | {numbers.metric(loss.get(step))} | {' | '.join(cells)} |")
    return lines


def cost(run: RunRecord) -> str:
    """One line: steps done, trainable parameters, wall time and peak memory."""
    s = run.summary
    if not s:
        return "The run has not finished (no summary.json): figures up to its last line."
    parts = []
    if "steps" in s:
        parts.append(f"{s['steps']} steps")
    if "trainable_params" in s:
        parts.append(f"{numbers.count(s['trainable_params'])} trainable parameters")
    parts.append(wall_time(run))
    parts.append(f"peak RSS of the process {numbers.megabytes(s.get('peak_rss_mb'))} MB")
    return "; ".join(parts) + "."


def write(run: RunRecord) -> Path:
    """Write RUN/report.md and its plots for a finetune or eval run; returns the report."""
    images = save_all(figures(run), run.path)
    lines = [
        f"# {plot_title(run)}",
        "",
        "## What was run",
        "",
        *what_was_run(run),
        "",
        "## Results",
        "",
        *results_table(run),
        "",
        cost(run),
        *(["", resumed_at(run)] if run.resumes else []),
    ]
    if len([r for r in run.metrics if any(k in r for k in EVAL_KEYS)]) > 1:
        lines += ["", "## Every evaluation", "", *evaluations(run)]
    lines += ["", *images]
    out = run.path / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def render(run_dir: str | Path) -> Path:
    """Read the run in `run_dir` and write its report (see `write`)."""
    return write(load_run(run_dir))
