"""`edgetune bench zo`: P-RGE against sequential MeZO on SmolLM2-135M, same machine, one run.

With q * b held at 16 (q in 1, 2, 4, 8; b = 16 / q), on real demo-task batches:
  - step time of sequential MeZO (2q passes of b rows), P-RGE outer-only (2 passes of q*b
    rows) and P-RGE outer+inner (1 pass of 2q*b rows), as ratios;
  - P-RGE step time over ONE inference forward of 2q*b rows (the floor);
  - peak memory of each vs plain inference over the rows of one of its passes;
  - time-to-accuracy on the demo task: held-out accuracy against training seconds for
    MeZO q=1, P-RGE q=4 and first-order LoRA (PNG).
Every measurement runs in its own child process (peak RSS is per process).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgetune.bench.markdown import threads_line
from edgetune.bench.memory import timed_steps
from edgetune.recipes.finetune import run_in_subprocess

TOTAL = 16  # q * b
QUERIES = (1, 2, 4, 8)
METHODS = ("mezo", "prge-outer", "prge")
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


def child(mode: str, q: int, rows: int, model_spec: str, peft: str, steps: int) -> dict:
    """Measure one mode in this process: `inference` over `rows` rows, or a ZO step with q
    queries and b = `rows` examples."""
    import torch

    from edgetune import models
    from edgetune.data import DataConfig, build_task, load_splits
    from edgetune.peft import PeftConfig, attach
    from edgetune.train.steps import PRGEStepper, ZOStepper
    from edgetune.zo import ZOSGD, MeZOEstimator
    from edgetune.zo.prge import PRGEEstimator

    model, tokenizer = models.load(model_spec)
    cfg = DataConfig(dataset="bbc-news", max_length=64, eval_size=16)
    splits = load_splits(cfg, 0)
    task = build_task(splits, cfg, tokenizer)
    data = task.prepare_rows(splits.train)
    adapter = attach(model, PeftConfig(method=peft), seed=0)
    if mode == "inference":
        batch = task.collate(data[:rows])

        def step(i: int) -> None:
            with torch.no_grad():
                task.example_losses(adapter.model, batch)
    else:
        if mode == "mezo":
            stepper: Any = ZOStepper(
                adapter, task, MeZOEstimator(1e-3, q, exact_restore=True), ZOSGD(), 1, 0
            )
        else:
            prge = PRGEEstimator(1e-3, q, parallel_inner=mode == "prge")
            stepper = PRGEStepper(adapter, task, prge, ZOSGD(), 1, 0)

        def step(i: int) -> None:
            stepper.step(data[i * rows : (i + 1) * rows], i, 1e-4)

    step_s, peak_mb = timed_steps(step, steps)
    return {
        "mode": mode,
        "q": q,
        "rows": rows,
        "step_s": step_s,
        "peak_mb": peak_mb,
        "threads": torch.get_num_threads(),
    }


def _spawn(mode: str, q: int, rows: int, model: str, peft: str, steps: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "edgetune.bench.zo",
        mode,
        str(q),
        str(rows),
        model,
        peft,
        str(steps),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"[bench zo] {result}", flush=True)
    return result


def measure_steps(model: str, peft: str, steps: int) -> dict[tuple, dict]:
    """All step-time / memory measurements, keyed by (mode, q) or ("inference", rows)."""
    results: dict[tuple, dict] = {}
    for rows in sorted({TOTAL // q for q in QUERIES} | {TOTAL, 2 * TOTAL}):
        results[("inference", rows)] = _spawn("inference", 1, rows, model, peft, steps)
    for q in QUERIES:
        for mode in METHODS:
            results[(mode, q)] = _spawn(mode, q, TOTAL // q, model, peft, steps)
    return results


def time_to_accuracy(model: str, out: Path, steps: int) -> dict[str, Path]:
    """Fine-tune MeZO q=1, P-RGE q=4 and FO LoRA on the demo task; return their run dirs."""
    runs = {
        "MeZO q=1 (b=16)": [
            "--method",
            "zo",
            "--batch-size",
            "16",
            "--lr",
            "2e-3",
            "--steps",
            str(steps),
        ],
        "P-RGE q=4 (b=4)": [
            "--method",
            "prge",
            "--queries",
            "4",
            "--batch-size",
            "4",
            "--lr",
            "2e-3",
            "--steps",
            str(steps),
        ],
        "first-order LoRA (b=8)": [
            "--method",
            "fo",
            "--batch-size",
            "8",
            "--lr",
            "5e-4",
            "--steps",
            str(max(steps // 2, 1)),
        ],
    }
    dirs = {}
    for i, (label, args) in enumerate(runs.items()):
        target = out / f"tta-{i}"
        every = max(int(args[args.index("--steps") + 1]) // 4, 1)
        print(f"[bench zo] time-to-accuracy: {label}", flush=True)
        run_in_subprocess(target, model, [*DATA, *args, f"train.eval_every={every}"], quiet=True)
        dirs[label] = target
    return dirs


def _accuracy_vs_seconds(run: Path) -> list[dict[str, float]]:
    from edgetune.runs import RunDir

    rd = RunDir(run, resume=True)
    seconds = {r["step"]: r["train_s"] for r in rd.read_metrics("timing.jsonl")}
    seconds[0] = 0.0
    return [
        {"train_s": seconds[r["step"]], "eval/accuracy": r["eval/accuracy"]}
        for r in rd.read_metrics()
        if "eval/accuracy" in r
    ]


def run(model: str, peft: str, steps: int, tta_steps: int, output: str, plot: str) -> None:
    """Run every measurement and write the section of docs/BENCHMARKS.md and the plot."""
    from edgetune.bench.markdown import machine_line, write_section
    from edgetune.report.plots import plot_metric

    results = measure_steps(model, peft, steps)
    work = Path("runs") / "bench-zo"
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
    inf = {rows: r for (mode, rows), r in results.items() if mode == "inference"}
    lines = [
        "## P-RGE vs sequential MeZO (`edgetune bench zo`)",
        "",
        f"Command: `edgetune bench zo --model {model} --peft {peft} --steps {steps} "
        f"--tta-steps {tta_steps}`  ",
        f"Machine: {machine}  ",
        threads_line([r.get("threads", 0) for r in results.values()], "measuring process"),
        f"q x b = {TOTAL} examples per step, 64-token BBC News prompts, LoRA ({peft}) on all "
        "projections; median of the timed steps after a warm-up step, each in its own process.",
        "",
        "| q | b | MeZO (s) | P-RGE outer (s) | P-RGE outer+inner (s) | speed-up outer | "
        "speed-up outer+inner | P-RGE / 1 fwd of 2qb | peak MB MeZO / outer / both | "
        "peak vs inference at the pass size |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for q in QUERIES:
        b = TOTAL // q
        m, o, p = (results[(mode, q)] for mode in METHODS)
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
    ]
    if curves:
        rel = (
            Path(plot).resolve().relative_to(Path(output).resolve().parent)
            if Path(plot).resolve().is_relative_to(Path(output).resolve().parent)
            else Path(plot)
        )
        lines += [
            "",
            "Time to accuracy (held-out accuracy, 150 articles, against cumulative "
            "training seconds, evaluation excluded):",
            "",
        ]
        for label, points in curves.items():
            trail = ", ".join(f"{pt['train_s']:.0f}s: {pt['eval/accuracy']:.3f}" for pt in points)
            lines.append(f"- {label}: {trail}")
        lines += ["", f"![time to accuracy]({rel})"]
    return "\n".join(lines)


if __name__ == "__main__":
    mode, q, rows, spec, peft, n = sys.argv[1:7]
    print(json.dumps(child(mode, int(q), int(rows), spec, peft, int(n))))
