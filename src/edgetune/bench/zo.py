"""`edgetune bench zo`: ZO step time with and without the shared trunk, on SmolLM2-135M.

Same machine, one run, every measurement in its own child process (peak RSS is per
process). With q * b held at 16 (q in 1, 2, 4, 8; b = 16 / q), on real demo-task batches:
  - full depth (LoRA on all 30 blocks): sequential MeZO (2q passes of b rows), P-RGE
    outer-only (2 passes of q*b rows) and outer+inner (1 pass of 2q*b rows), and one
    inference forward by rows (the floor);
  - shared trunk: LoRA on the top k blocks (k in `TRUNK_TOPS`; 30 = full depth), MeZO and
    P-RGE with the bottom 30 - k blocks run once per step, and beside each its floor: one
    forward over the rows that must run (the trunk over b rows, the top k blocks over
    2q*b rows);
  - peak memory of each;
  - time-to-accuracy on the demo task (`TTA_RUNS`): held-out accuracy against training
    seconds (PNG), and the seconds each run takes to reach the accuracy that the first
    run (sequential MeZO on all blocks, the demo's setting before the shared trunk) ends at.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgetune.bench.markdown import threads_line
from edgetune.bench.memory import timed_steps
from edgetune.recipes.demo import PRGE
from edgetune.recipes.finetune import run_in_subprocess

TOTAL = 16  # q * b
QUERIES = (1, 2, 4, 8)
METHODS = ("mezo", "prge-outer", "prge")
BLOCKS = 30  # SmolLM2-135M's transformer blocks
TRUNK_TOPS = (2, 4, 6, 10, BLOCKS)  # blocks that train; the rest is the shared trunk
DATA = [
    "--dataset",
    "bbc-news",
    "data.max_length=64",
    "data.eval_size=150",
    "train.eval_batch_size=25",
    "train.progress=false",
    "--seed",
    "0",
]
# The time-to-accuracy runs: label -> (arguments, steps as a multiple of --tta-steps). The
# first is the reference: sequential MeZO on all blocks (`recipes/demo.py`, --zo mezo); top 6
# is the demo's default (--zo prge-top6). The shared-trunk runs train LoRA on
# the last k blocks only; a step costs a third to a half of a full-depth one, so they get
# twice the steps (their accuracy at equal steps is read off the same curve). Their step
# size: on top-6 LoRA, ZO-SGD at lr 1e-2 and above diverged within 60 steps here (MeZO q=1
# by step 30, P-RGE q=4 by step 60, after 0.793 at step 30); 5e-3 did not.
MEZO = ["--method", "zo", "--batch-size", "16"]
TTA_RUNS: dict[str, tuple[list[str], float]] = {
    "MeZO q=1 (b=16), all blocks (reference)": ([*MEZO, "--lr", "2e-3"], 1.0),
    "P-RGE q=4 (b=4), all blocks": ([*PRGE, "--lr", "2e-3"], 1.0),
    "P-RGE q=4 (b=4), top 6, trunk shared (demo)": (
        [*PRGE, "--lr", "5e-3", "peft.layers=top:6"],
        2.0,
    ),
    "P-RGE q=4 (b=4), top 10, trunk shared": (
        [*PRGE, "--lr", "5e-3", "peft.layers=top:10"],
        2.0,
    ),
    "first-order LoRA (b=8), all blocks": (
        ["--method", "fo", "--batch-size", "8", "--lr", "5e-4"],
        0.5,
    ),
}


def child(mode: str, q: int, rows: int, model_spec: str, peft: str, steps: int, top: int) -> dict:
    """Measure one mode in this process, LoRA on the top `top` blocks with the trunk below
    them shared: `inference` (full depth) over `rows` rows, `floor` (the trunk over `rows`
    rows, the top over 2q x `rows`), or a ZO step (`mezo`, `prge-outer`, `prge`) with q
    queries and b = `rows` examples."""
    import torch

    from edgetune import models
    from edgetune.data import DataConfig, build_task, load_splits
    from edgetune.peft import PeftConfig, attach
    from edgetune.peft.multicopy import repeat_batch
    from edgetune.train.steps import PRGEStepper, ZOStepper
    from edgetune.train.trunk import resolve_trunk
    from edgetune.zo import ZOSGD, MeZOEstimator
    from edgetune.zo.prge import PRGEEstimator

    model, tokenizer = models.load(model_spec)
    cfg = DataConfig(dataset="bbc-news", max_length=64, eval_size=16)
    splits = load_splits(cfg, 0)
    task = build_task(splits, cfg, tokenizer)
    data = task.prepare_rows(splits.train)
    layers = "all" if top >= BLOCKS else f"top:{top}"
    adapter = attach(model, PeftConfig(method=peft, layers=layers), seed=0)
    trunk = resolve_trunk("auto", adapter.model)
    if mode in ("inference", "floor"):
        batch = task.collate(data[:rows])
        repeated = batch if mode == "inference" else repeat_batch(batch, 2 * q)

        def step(i: int) -> None:
            with torch.no_grad(), trunk.top(trunk.hidden(batch) if mode == "floor" else None):
                task.example_losses(adapter.model, repeated)

    else:
        if mode == "mezo":
            estimator = MeZOEstimator(1e-3, q, exact_restore=True)
            stepper: Any = ZOStepper(adapter, task, estimator, ZOSGD(), 1, 0, trunk)
        else:
            prge = PRGEEstimator(1e-3, q, parallel_inner=mode == "prge")
            stepper = PRGEStepper(adapter, task, prge, ZOSGD(), 1, 0, trunk=trunk)

        def step(i: int) -> None:
            stepper.step(data[i * rows : (i + 1) * rows], i, 1e-4)

    step_s, peak_mb = timed_steps(step, steps)
    return {
        "mode": mode,
        "q": q,
        "rows": rows,
        "top": top,
        "trunk_blocks": trunk.cut,
        "step_s": step_s,
        "peak_mb": peak_mb,
        "threads": torch.get_num_threads(),
    }


def _spawn(mode: str, q: int, rows: int, model: str, peft: str, steps: int, top: int) -> dict:
    cmd = [sys.executable, "-m", "edgetune.bench.zo", mode, str(q), str(rows), model, peft]
    out = subprocess.run([*cmd, str(steps), str(top)], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"[bench zo] {result}", flush=True)
    return result


def measure_steps(model: str, peft: str, steps: int) -> dict[tuple, dict]:
    """All step-time / memory measurements, keyed by (mode, q, top) or
    ("inference", rows, BLOCKS)."""
    results: dict[tuple, dict] = {}
    for rows in sorted({TOTAL // q for q in QUERIES} | {TOTAL, 2 * TOTAL}):
        results[("inference", rows, BLOCKS)] = _spawn(
            "inference", 1, rows, model, peft, steps, BLOCKS
        )
    for q in QUERIES:
        results[("prge-outer", q, BLOCKS)] = _spawn(
            "prge-outer", q, TOTAL // q, model, peft, steps, BLOCKS
        )
        for top in TRUNK_TOPS:
            for mode in ("mezo", "prge", "floor"):
                results[(mode, q, top)] = _spawn(mode, q, TOTAL // q, model, peft, steps, top)
    return results


def cached_steps(path: Path, model: str, peft: str, steps: int) -> dict[tuple, dict]:
    """`measure_steps`, or the measurements a previous run with the same arguments saved
    in `path` (the step-time grid takes about 15 minutes; the time-to-accuracy runs can
    then be redone alone). Delete the file to measure again."""
    args = {"model": model, "peft": peft, "steps": steps, "tops": list(TRUNK_TOPS)}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("args") == args:
            print(f"[bench zo] step times from {path} (delete it to measure again)", flush=True)
            return {_key(r): r for r in saved["results"]}
    results = measure_steps(model, peft, steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": args, "results": list(results.values())}, indent=1))
    return results


def _key(result: dict) -> tuple:
    if result["mode"] == "inference":
        return ("inference", result["rows"], BLOCKS)
    return (result["mode"], result["q"], result["top"])


def time_to_accuracy(model: str, out: Path, steps: int) -> dict[str, Path]:
    """Fine-tune each of `TTA_RUNS` on the demo task, evaluating 6 times; return their run
    directories."""
    dirs = {}
    for i, (label, (args, factor)) in enumerate(TTA_RUNS.items()):
        target = out / f"tta-{i}"
        count = max(int(steps * factor), 1)
        every = max(count // 6, 1)
        print(f"[bench zo] time-to-accuracy: {label}", flush=True)
        run_in_subprocess(
            target,
            model,
            [*DATA, *args, "--steps", str(count), f"train.eval_every={every}"],
            quiet=True,
        )
        dirs[label] = target
    return dirs


def _accuracy_vs_seconds(run: Path) -> list[dict[str, float]]:
    from edgetune.runs import RunDir

    rd = RunDir(run, resume=True)
    seconds = {r["step"]: r["train_s"] for r in rd.read_metrics("timing.jsonl")}
    seconds[0] = 0.0
    return [
        {"step": r["step"], "train_s": seconds[r["step"]], "eval/accuracy": r["eval/accuracy"]}
        for r in rd.read_metrics()
        if "eval/accuracy" in r
    ]


def run(model: str, peft: str, steps: int, tta_steps: int, output: str, plot: str) -> None:
    """Run every measurement and write the section of docs/BENCHMARKS.md and the plot."""
    from edgetune.bench.markdown import machine_line, write_section
    from edgetune.report.plots import plot_metric

    work = Path("runs") / "bench-zo"
    results = cached_steps(work / "steps.json", model, peft, steps)
    dirs = time_to_accuracy(model, work, tta_steps) if tta_steps else {}
    curves = {label: _accuracy_vs_seconds(d) for label, d in dirs.items()}
    if curves:
        plot_metric(
            curves,
            "eval/accuracy",
            plot,
            x="train_s",
            title=f"{model}, BBC News: held-out accuracy vs training seconds",
        )
    body = render(results, curves, model, peft, steps, tta_steps, plot, output, machine_line())
    write_section(output, "zo", body)
    print(body)


def render(
    results: dict,
    curves: dict,
    model: str,
    peft: str,
    steps: int,
    tta_steps: int,
    plot: str,
    output: str,
    machine: str,
) -> str:
    """The Markdown section."""
    inf = {rows: r for (mode, rows, _), r in results.items() if mode == "inference"}
    lines = [
        "## ZO step time: P-RGE, sequential MeZO and the shared trunk (`edgetune bench zo`)",
        "",
        f"Command: `edgetune bench zo --model {model} --peft {peft} --steps {steps} "
        f"--tta-steps {tta_steps}`  ",
        f"Machine: {machine}  ",
        threads_line([r.get("threads", 0) for r in results.values()], "measuring process"),
        f"q x b = {TOTAL} examples per step, 64-token BBC News prompts; median of the timed "
        "steps after a warm-up step, each configuration in its own process.",
        "",
        f"### Full depth: LoRA ({peft}) on all {BLOCKS} blocks",
        "",
        "| q | b | MeZO (s) | P-RGE outer (s) | P-RGE outer+inner (s) | speed-up outer | "
        "speed-up outer+inner | P-RGE / 1 fwd of 2qb | peak MB MeZO / outer / both | "
        "peak vs inference at the pass size |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for q in QUERIES:
        b = TOTAL // q
        m, o, p = (results[(mode, q, BLOCKS)] for mode in METHODS)
        floor = inf[2 * TOTAL]["step_s"]
        ratios = (
            m["peak_mb"] / inf[b]["peak_mb"],
            o["peak_mb"] / inf[q * b]["peak_mb"],
            p["peak_mb"] / inf[2 * q * b]["peak_mb"],
        )
        lines.append(
            f"| {q} | {b} | {m['step_s']:.2f} | {o['step_s']:.2f} | {p['step_s']:.2f} | "
            f"{m['step_s'] / o['step_s']:.2f}x | {m['step_s'] / p['step_s']:.2f}x | "
            f"{p['step_s'] / floor:.2f} | {m['peak_mb']:.0f} / {o['peak_mb']:.0f} / "
            f"{p['peak_mb']:.0f} | {ratios[0]:.2f}x / {ratios[1]:.2f}x / {ratios[2]:.2f}x |"
        )
    lines += [
        "",
        "Inference forward (the floor), by rows: "
        + ", ".join(
            f"{rows} rows {r['step_s']:.2f} s / {r['peak_mb']:.0f} MB"
            for rows, r in sorted(inf.items())
        ),
        "",
        *render_trunk(results),
    ]
    if curves:
        lines += ["", *render_curves(curves, plot, output)]
    return "\n".join(lines)


def render_trunk(results: dict) -> list[str]:
    """The shared-trunk table and its headline against sequential MeZO at full depth."""
    lines = [
        "### Shared trunk: LoRA on the top k blocks, the other 30 - k run once per step",
        "",
        "Floor: one forward over the rows that must run (the trunk over b rows, the top k "
        "blocks over 2q*b rows). Speed-ups are against sequential MeZO at the same q on "
        "all 30 blocks (the table above).",
        "",
        "| q | b | top k | MeZO (s) | P-RGE (s) | floor (s) | P-RGE / floor | "
        "speed-up MeZO | speed-up P-RGE | peak MB MeZO / P-RGE |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for q in QUERIES:
        base = results[("mezo", q, BLOCKS)]["step_s"]
        for top in TRUNK_TOPS:
            m, p, f = (results[(mode, q, top)] for mode in ("mezo", "prge", "floor"))
            lines.append(
                f"| {q} | {TOTAL // q} | {top} | {m['step_s']:.2f} | {p['step_s']:.2f} | "
                f"{f['step_s']:.2f} | {p['step_s'] / f['step_s']:.2f} | "
                f"{base / m['step_s']:.2f}x | {base / p['step_s']:.2f}x | "
                f"{m['peak_mb']:.0f} / {p['peak_mb']:.0f} |"
            )
    if 4 in QUERIES:
        base = results[("mezo", 4, BLOCKS)]["step_s"]
        best = min(
            (t for t in TRUNK_TOPS if t < BLOCKS), key=lambda t: results[("prge", 4, t)]["step_s"]
        )
        fastest = results[("prge", 4, best)]["step_s"]
        six = results[("prge", 4, 6)]["step_s"] if 6 in TRUNK_TOPS else fastest
        lines += [
            "",
            f"P-RGE with the trunk shared at q = 4: {base / six:.2f}x faster per step than "
            f"sequential MeZO at q = 4 on all blocks with k = 6 ({six:.2f} s against "
            f"{base:.2f} s), {base / fastest:.2f}x at k = {best} (target: at least 2x).",
        ]
    return lines


def reached(points: list[dict[str, float]], accuracy: float) -> float | None:
    """Training seconds at the first evaluation at or above `accuracy` (None: never)."""
    return next((p["train_s"] for p in points if p["eval/accuracy"] >= accuracy), None)


def render_curves(curves: dict, plot: str, output: str) -> list[str]:
    """Each run's accuracy trail and its time to the first (reference) run's final accuracy."""
    rel = (
        Path(plot).resolve().relative_to(Path(output).resolve().parent)
        if Path(plot).resolve().is_relative_to(Path(output).resolve().parent)
        else Path(plot)
    )
    reference = curves[next(iter(curves))]
    target = reference[-1]["eval/accuracy"]
    reference_s = reached(reference, target)
    lines = [
        "Time to accuracy (held-out accuracy, 150 articles, against cumulative training "
        f"seconds, evaluation excluded). Target: the accuracy the first run ends at, "
        f"{target:.3f}.",
        "",
        "| run | steps | final accuracy | training s | s to reach "
        f"{target:.3f} | faster than the reference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, points in curves.items():
        seconds = reached(points, target)
        ratio = f"{reference_s / seconds:.2f}x" if seconds and reference_s else "-"
        lines.append(
            f"| {label} | {points[-1]['step']} | {points[-1]['eval/accuracy']:.3f} | "
            f"{points[-1]['train_s']:.0f} | {f'{seconds:.0f}' if seconds is not None else 'not reached'} "
            f"| {ratio} |"
        )
    lines.append("")
    for label, points in curves.items():
        trail = ", ".join(f"{pt['train_s']:.0f}s: {pt['eval/accuracy']:.3f}" for pt in points)
        lines.append(f"- {label}: {trail}")
    lines += ["", f"![time to accuracy]({rel})"]
    return lines


if __name__ == "__main__":
    mode, q, rows, spec, peft, n, top = sys.argv[1:8]
    print(json.dumps(child(mode, int(q), int(rows), spec, peft, int(n), int(top))))
