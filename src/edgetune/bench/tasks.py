"""`edgetune bench tasks`: does fine-tuning with the default recipes work on tasks that
did not choose them?

Each task x seed x row is one `edgetune finetune` process (one `edgetune eval` for the
inference baseline), so every figure, peak memory included, is that process's own.
Rows:

- zero-shot: `edgetune eval` of the base model on the held-out rows (its peak RSS is the
  inference baseline the memory targets compare with);
- fo: first-order LoRA on all blocks (the accuracy a device that can backprop reaches);
- fo-top6: first-order LoRA on the top 6 blocks (activations kept for 6 blocks only);
- zo-mezo / zo-prge: the default ZO recipe (no --lr: scalars divided by their running
  RMS at the recipe's step size, guard on, best evaluation kept) with sequential MeZO
  (q = 1, 16 rows a step) and with P-RGE (q = 4 on 4 rows), LoRA on the top 6 blocks;
- zo-prge-raw: P-RGE as the demo ran it before the recipe (raw scalars, lr 5e-3), the
  lever's own effect;
- zo-prge-3x: zo-prge for 240 steps, about 3x first-order's training seconds on this
  CPU (P-RGE on the top 6 blocks takes about half of a first-order step), so the time-to-
  80 % target can be reached within its budget (120 steps stop at about 1.6x).

For each: the held-out metric of the saved adapter and of the last evaluation, training
seconds (evaluation excluded), time to 80 % of first-order's gain over zero-shot, and
peak RSS. Tasks: SST-2, AG News, BBC News (accuracy), Dolly open_qa (ROUGE-L),
TinyStories (held-out loss). Runs that finished are reused, so seeds or tasks can run in
separate processes and a cut-off bench continues where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetune.bench.markdown import machine_line, write_section
from edgetune.errors import ConfigError
from edgetune.recipes.finetune import run_in_subprocess
from edgetune.runs import RunDir
from edgetune.train.guard import headline


@dataclass(frozen=True)
class Task:
    dataset: str
    max_length: int
    eval_size: int


TASKS = {
    "sst2": Task("sst2", 64, 300),
    "ag-news": Task("ag-news", 64, 300),
    "bbc-news": Task("bbc-news", 64, 300),
    "dolly-openqa": Task("dolly-openqa", 128, 100),
    "tinystories": Task("tinystories", 128, 100),
}
TOP = ("--peft", "lora", "peft.layers=top:6")
ZO_STEPS = ("--steps", "120", "train.eval_every=30")
ROWS: dict[str, tuple[str, ...]] = {
    "fo": ("--method", "fo", "--peft", "lora", "--steps", "40", "--batch-size", "8",
           "--lr", "5e-4", "train.eval_every=10"),
    "fo-top6": ("--method", "fo", *TOP, "--steps", "40", "--batch-size", "8", "--lr", "5e-4",
                "train.eval_every=10"),
    "zo-mezo": ("--method", "zo", *TOP, *ZO_STEPS, "--batch-size", "16"),
    "zo-prge": ("--method", "prge", "--queries", "4", "--batch-size", "4", *TOP, *ZO_STEPS),
    "zo-prge-raw": ("--method", "prge", "--queries", "4", "--batch-size", "4", *TOP,
                    *ZO_STEPS, "--lr", "5e-3"),
    "zo-prge-3x": ("--method", "prge", "--queries", "4", "--batch-size", "4", *TOP,
                   "--steps", "240", "train.eval_every=30"),
}  # fmt: skip
# Tiny settings for the test: the whole pipeline on stories260K in seconds.
QUICK_TASK = Task("sst2", 32, 16)
QUICK = {
    "fo": ("--method", "fo", "--steps", "4", "--batch-size", "4", "train.eval_every=2"),
    "zo-prge": ("--method", "prge", "--queries", "2", "--batch-size", "4", "--steps", "4",
                "peft.layers=top:2", "train.eval_every=2"),
}  # fmt: skip


def check(tasks: list[str], rows: list[str], quick: bool) -> None:
    """Refuse an unknown task or row, naming the known ones.

    Raises:
        ConfigError: names the unknown value and the choices.
    """
    known_rows = QUICK if quick else ROWS
    for kind, given, known in (("task", tasks, TASKS), ("row", rows, known_rows)):
        unknown = [x for x in given if x not in known]
        if unknown:
            mode = " in --quick mode" if quick and kind == "row" else ""
            raise ConfigError(
                f"bench tasks: unknown {kind} {', '.join(unknown)}{mode}; choose from "
                f"{', '.join(known)}"
            )


def run_one(model: str, task: Task, row: str, args: tuple[str, ...], seed: int, out: Path) -> dict:
    """One row's process (reused when its summary exists); the figures of `collect`."""
    if not (out / "summary.json").is_file():
        common = [
            "--dataset",
            task.dataset,
            "--seed",
            str(seed),
            f"data.eval_size={task.eval_size}",
            f"data.max_length={task.max_length}",
        ]
        if row == "zero-shot":
            run_in_subprocess(out, model, [*common, *args], True, "eval", overwrite=False)
        else:
            run_in_subprocess(out, model, [*common, *args, "train.progress=false"], True)
    return collect(out)


def collect(run: Path) -> dict[str, Any]:
    """Figures of a finished run: the saved adapter's and the last evaluation's headline,
    training seconds, and the metric after each evaluation against training seconds."""
    summary = json.loads((run / "summary.json").read_text())
    head = headline(summary)
    key = head[0] if head else None
    record = {"key": key, "kept": summary.get(key), "peak_rss_mb": summary.get("peak_rss_mb")}
    rundir = RunDir(run, resume=True)
    if not rundir.metrics_path.exists() or "steps" not in summary:  # an eval-only run
        return {**record, "last": record["kept"], "train_s": 0.0, "curve": []}
    seconds = {r["step"]: r["train_s"] for r in rundir.read_metrics("timing.jsonl")}
    seconds[0] = 0.0
    curve = [(seconds[r["step"]], r[key]) for r in rundir.read_metrics() if key in r]
    last = summary.get("last_eval", {}).get(key, record["kept"])
    return {
        **record,
        "last": last,
        "initial": summary.get("initial_eval", {}).get(key),
        "train_s": seconds.get(summary["steps"], 0.0),
        "curve": curve,
        "rollbacks": summary.get("rollbacks", 0),
        "kept_step": summary.get("kept", {}).get("step"),
    }


def seconds_to(curve: list[tuple[float, float]], target: float, up: bool) -> float | None:
    """Training seconds at the first evaluation at or beyond `target`."""
    return next((s for s, v in curve if (v >= target if up else v <= target)), None)


def run(
    model: str,
    tasks: list[str],
    seeds: list[int],
    rows: list[str],
    output: str,
    work: str,
    quick: bool = False,
) -> dict:
    """Every task x seed x row (reusing finished runs), then the section of `output`."""
    table = QUICK if quick else ROWS
    results: dict[tuple[str, int, str], dict] = {}
    for name in tasks:
        task = QUICK_TASK if quick else TASKS[name]
        for seed in seeds:
            folder = Path(work) / name / f"seed{seed}"
            zero = run_one(model, task, "zero-shot", (), seed, folder / "zero-shot")
            results[(name, seed, "zero-shot")] = zero
            for row in rows:
                results[(name, seed, row)] = run_one(
                    model, task, row, table[row], seed, folder / row
                )
    flags = " --quick" if quick else ""
    command = (
        f"edgetune bench tasks --model {model} --tasks {','.join(tasks)} --seeds "
        f"{','.join(map(str, seeds))} --rows {','.join(rows)}{flags}"
    )
    body = render(command, tasks, seeds, rows, results)
    picture = Path(output).parent / "bench_tasks.png"
    plot(tasks, seeds[0], rows, results, picture)
    write_section(output, "tasks", f"{body}\n![metric against training seconds]({picture.name})\n")
    return results


def plot(tasks: list[str], seed: int, rows: list[str], results: dict, path: Path) -> None:
    """One panel per task: each row's held-out metric against training seconds (`seed`),
    zero-shot as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, name in zip(axes[0], tasks, strict=True):
        zero = results[(name, seed, "zero-shot")]
        ax.axhline(zero["kept"], color="grey", linestyle="--", label="zero-shot")
        for i, row in enumerate(rows):  # one colour per row in every panel
            curve = results.get((name, seed, row), {}).get("curve")
            if curve:
                xy = zip(*curve, strict=True)
                ax.plot(*xy, marker="o", markersize=3, label=row, color=f"C{i}")
        ax.set_title(f"{name} (seed {seed})")
        ax.set_xlabel("training seconds")
        ax.set_ylabel(zero["key"] or "metric")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(command: str, tasks: list[str], seeds: list[int], rows: list[str], results: dict) -> str:
    """The Markdown section: one table per task (rows x seeds; a row a task did not run is
    left out)."""
    lines = [
        "## Fine-tuning across tasks: the default recipes (`edgetune bench tasks`)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line()}  ",
        "Each row is its own process. metric = the saved adapter's held-out metric (every "
        "row evaluates, so keeps its best evaluation: train.keep=auto), last = the last "
        "evaluation's; s = training "
        "seconds, evaluation excluded; to 80 % = training seconds until an evaluation "
        "reached zero-shot + 80 % of first-order's gain.",
        "",
    ]
    for name in tasks:
        lines += _task_table(name, seeds, rows, results)
    return "\n".join(lines)


def _task_table(name: str, seeds: list[int], rows: list[str], results: dict) -> list[str]:
    key = results[(name, seeds[0], "zero-shot")]["key"]
    up = key != "eval/loss"
    lines = [
        f"### {name} ({key}, {'higher' if up else 'lower'} is better)",
        "",
        "| row | seed | metric | last | s | to 80 % (s) | rollbacks | peak RSS MB | vs inference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seed in seeds:
        zero = results[(name, seed, "zero-shot")]
        fo = results.get((name, seed, "fo"))
        target = zero["kept"] + 0.8 * (fo["kept"] - zero["kept"]) if fo else None
        lines.append(
            f"| zero-shot | {seed} | {zero['kept']:.3f} | - | - | - | - | "
            f"{zero['peak_rss_mb']:.0f} | 1.00x |"
        )
        for row in rows:
            if (name, seed, row) not in results:
                continue
            r = results[(name, seed, row)]
            reach = seconds_to(r["curve"], target, up) if target is not None else None
            lines.append(
                f"| {row} | {seed} | {r['kept']:.3f} | {r['last']:.3f} | {r['train_s']:.1f} | "
                f"{'-' if reach is None else f'{reach:.1f}'} | {r.get('rollbacks', 0)} | "
                f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / zero['peak_rss_mb']:.2f}x |"
            )
    return [*lines, ""]
