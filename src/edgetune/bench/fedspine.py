"""`edgetune bench fedspine`: FedSpine against the baselines its paper compares with.

SmolLM2-135M on BBC News (the demo task), 10 clients of the `mixed` fleet (phones at 60
GFLOP/s and 10 Mbit/s up to an AGX Orin at 2,500 and 100: a >= 10x spread in compute and
in uplink), Dirichlet 0.5 label skew, 30 % participation, 3 local steps of batch 4, the
same round budget and seed for every row. Each row is one `edgetune federate` process
with one torch thread (rows are compared on simulated seconds, not wall time):

  1. FedIT on the unpruned model;
  2. FedSpine: a bandit per device class picks (pruning level, LoRA rank), 20 % target;
  3. FedSpine with random arms (`spine.policy=random`), the ablation of the bandit;
  4. FedIT with uniform pruning (`spine.policy=uniform`) at row 2's average deployed
     sparsity, so it runs after row 2 of the same seed;
  5. heterogeneous LoRA ranks only (HetLoRA-style, `fed.ranks=device`), no pruning.

The target accuracy of a seed is halfway from zero-shot to the best final accuracy of its
rows (as `bench fed` sets it); "simulated s to target" is the simulated time of the first
round at or above it. Average sparsity weighs each device class's deployed ratio by its
devices (summary.json `classes`; 0 for the FedIT rows).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetune.bench.fed import common_flags, summarise
from edgetune.bench.markdown import machine_line, threads_line, write_section
from edgetune.recipes.finetune import run_in_subprocess

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CLIENTS = 10
FLEET = "mixed"
# 0.2, not the 0.3 of the example: `bench compress` measured SmolLM2-135M at 0.34
# accuracy after pruning 30 % of its units (0.53 after distilled recovery), against 0.91
# at 10 %, so a 0.3 target would compare rows that all end near chance.
TARGET_SPARSITY = 0.2
THREADS = 1  # per federate process; the rows run one after the other
PLOT = "bench_fedspine.png"  # beside the Markdown file
# Targets: FedSpine reaches the target accuracy this much sooner than uniform pruning.
SPEEDUP = 1.4


@dataclass(frozen=True)
class Row:
    """One `edgetune federate` run per seed: its folder name, label and flags."""

    name: str
    label: str
    args: tuple[str, ...]


FEDIT, SPINE, RANDOM, UNIFORM, HETLORA = "fedit", "fedspine", "random", "uniform", "hetlora"
SPINE_ARGS = ("--algorithm", "fedspine", "--method", "auto")
ROWS = (
    Row(FEDIT, "FedIT, unpruned", ("--algorithm", "fedit", "--method", "auto")),
    Row(
        SPINE,
        "FedSpine (bandit)",
        (*SPINE_ARGS, "--target-sparsity", str(TARGET_SPARSITY), "spine.policy=bandit"),
    ),
    Row(
        RANDOM,
        "FedSpine, random arms",
        (*SPINE_ARGS, "--target-sparsity", str(TARGET_SPARSITY), "spine.policy=random"),
    ),
    Row(UNIFORM, "FedIT + uniform pruning", (*SPINE_ARGS, "spine.policy=uniform")),
    Row(
        HETLORA,
        "HetLoRA ranks only",
        ("--algorithm", "fedit", "--method", "auto", "fed.ranks=device"),
    ),
)


def federate_args(
    row: Row,
    model: str,
    rounds: int,
    seed: int,
    eval_size: int = 100,
    train_size: int | None = None,
    sparsity: float | None = None,
) -> list[str]:
    """The `edgetune federate` flags of `row` (all but --out).

    Args:
        row: one of ROWS.
        model: built-in name or folder.
        rounds: federated rounds (the same for every row).
        seed: data split, partition and training seed.
        eval_size: held-out articles per evaluation.
        train_size: training rows (None: the whole training split).
        sparsity: the uniform row's target sparsity (row 2's average).
    """
    args = [
        *common_flags(model, rounds, CLIENTS, fleet=FLEET, eval_size=eval_size, seed=seed),
        *("--threads", str(THREADS), "--lr", "5e-4"),
        *row.args,
    ]
    if row.name == UNIFORM:
        args += ["--target-sparsity", f"{sparsity:.4f}"]
    if train_size is not None:
        args.append(f"data.train_size={train_size}")
    return args


def average_sparsity(summary: dict[str, Any]) -> float:
    """The device-weighted mean pruning ratio of the deployed models (0 without classes)."""
    classes = summary.get("classes") or {}
    devices = sum(c["devices"] for c in classes.values())
    return sum(c["ratio"] * c["devices"] for c in classes.values()) / devices if devices else 0.0


SPEED_REPEATS = 3  # median of this many runs per deployed model


def deployed_speed(summary: dict[str, Any], measured: dict[str, float]) -> float | None:
    """The device-weighted mean greedy decode tokens/s of a row's deployed per-class
    models (summary `classes`), each measured here, once, at batch 1 (`measured` caches
    them by folder); None for rows that deploy the full model (no classes). Measured by
    the bench after every row has run, so on a quiet CPU, not inside the federate runs."""
    classes = (summary.get("classes") or {}).values()
    if not classes:
        return None
    for c in classes:
        if c["folder"] not in measured:
            measured[c["folder"]] = decode_speed(str(Path(c["folder"]) / "model"))
    devices = sum(c["devices"] for c in classes)
    return sum(measured[c["folder"]] * c["devices"] for c in classes) / devices


def decode_speed(model_path: str) -> float:
    """Greedy decode tokens/s of the model at `model_path` (batch 1, this CPU)."""
    from edgetune import models
    from edgetune.compress.speed import measure_speed, prefill_ids

    model, _ = models.load(model_path)
    ids = prefill_ids(model.config.vocab_size, 0)
    return measure_speed(model, ids, SPEED_REPEATS)["decode_tokens_per_s"]


ARGS_FILE = "bench_args.json"  # the federate arguments a row's folder was run with


def run(
    model: str,
    rounds: int,
    seeds: list[int],
    output: str,
    work: str,
    eval_size: int = 100,
    train_size: int | None = None,
) -> str:
    """Run the five rows for every seed, then write the section and the plot; returns
    the section."""
    from edgetune.report.plots import save

    runs: dict[int, dict[str, Path]] = {}
    for seed in seeds:
        dirs = runs[seed] = {}
        sparsity = None
        for row in ROWS:
            dirs[row.name] = out = Path(work) / str(seed) / row.name
            print(f"[bench fedspine] seed {seed}: {row.label}", flush=True)
            args = federate_args(row, model, rounds, seed, eval_size, train_size, sparsity)
            if not _finished(out, args):
                # run_in_subprocess repeats --model and --overwrite, which args hold already
                run_in_subprocess(out, model, args, quiet=True, command="federate")
                (out / ARGS_FILE).write_text(json.dumps(args))
            if row.name == SPINE:
                sparsity = average_sparsity(summarise(out, 2.0)["summary"])
    print("[bench fedspine] measuring the deployed models' decode speed", flush=True)
    measured = {"unpruned": decode_speed(model)}
    results = {seed: summarise_seed(dirs, measured) for seed, dirs in runs.items()}
    plot = Path(output).parent / PLOT
    save(figure(results[seeds[0]], model, seeds[0]), plot)
    body = render(results, model, rounds, eval_size, train_size, machine_line(), measured)
    write_section(output, "fedspine", body)
    print(body)
    return body


def _finished(out: Path, args: list[str]) -> bool:
    """Whether `out` holds a finished run of exactly these federate arguments (such a row
    is not rerun: seeds may run in parallel processes, then one call renders them all)."""
    try:
        same = json.loads((out / ARGS_FILE).read_text()) == args
        return same and json.loads((out / "summary.json").read_text())["status"] == "done"
    except (OSError, ValueError, KeyError):
        return False


def summarise_seed(dirs: dict[str, Path], measured: dict[str, float]) -> dict[str, dict]:
    """Each row's results of one seed, with the seed's target accuracy: halfway from the
    zero-shot accuracy (FedIT's round 0) to the best final accuracy among the rows;
    `measured` caches the deployed models' speeds (`deployed_speed`)."""
    first = {name: summarise(d, 2.0) for name, d in dirs.items()}
    start = first[FEDIT]["start"]
    target = round(start + 0.5 * (max(r["final"] for r in first.values()) - start), 3)
    out = {}
    for name, d in dirs.items():
        r = summarise(d, target)
        s = r["summary"]
        classes = s.get("classes") or {}
        out[name] = {
            **r,
            "target": target,
            "bytes": s["bytes_up"] + s["bytes_down"],
            "sim_s": s["sim_s"],
            "sparsity": average_sparsity(s),
            "class_ratios": {c: v["ratio"] for c, v in classes.items()},
            "tokens_per_s": deployed_speed(s, measured),
        }
    return out


def figure(results: dict[str, dict], model: str, seed: int) -> Figure:
    """Held-out accuracy against simulated seconds, one line per row (round 0 at 0 s)."""
    from edgetune.report.federated import cumulative
    from edgetune.report.plots import metric_figure
    from edgetune.report.run_info import short_name

    labels = {row.name: row.label for row in ROWS}
    series = {labels[name]: cumulative(r["rows"]) for name, r in results.items()}
    title = f"{short_name(model)} on bbc-news, {CLIENTS} clients ({FLEET} fleet), seed {seed}"
    return metric_figure(series, "eval/accuracy", x="total_sim_s", title=title)


def mean_or_none(values: list[float | None]) -> float | None:
    """The mean, or None if any value is None (a seed that never reached the target)."""
    return None if any(v is None for v in values) else statistics.fmean(values)  # type: ignore[arg-type]


def mean_results(results: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Per row, the columns averaged over the seeds (None where a seed has none)."""
    out = {}
    for row in ROWS:
        per = [results[seed][row.name] for seed in results]
        classes = sorted({c for r in per for c in r["class_ratios"]})
        out[row.name] = {
            "final": statistics.fmean(r["final"] for r in per),
            "sim_s_to_target": mean_or_none([r["sim_s_to_target"] for r in per]),
            "bytes": statistics.fmean(r["bytes"] for r in per),
            "sim_s": statistics.fmean(r["sim_s"] for r in per),
            "sparsity": statistics.fmean(r["sparsity"] for r in per),
            "class_ratios": {
                c: statistics.fmean(r["class_ratios"].get(c, 0.0) for r in per) for c in classes
            },
            "tokens_per_s": mean_or_none([r["tokens_per_s"] for r in per]),
        }
    return out


def targets(mean: dict[str, dict]) -> list[str]:
    """The targets, each PASS or MISS with what was measured."""
    spine, uniform, random = mean[SPINE], mean[UNIFORM], mean[RANDOM]
    t_spine, t_uniform = spine["sim_s_to_target"], uniform["sim_s_to_target"]
    if t_spine is None:
        speed = "MISS: FedSpine did not reach the target accuracy in every seed"
    elif t_uniform is None:
        speed = f"PASS: uniform pruning never reached it in every seed (FedSpine {t_spine:.1f} s)"
    else:
        ratio = t_uniform / t_spine if t_spine > 0 else float("inf")
        verdict = "PASS" if ratio >= SPEEDUP else "MISS"
        speed = f"{verdict}: {ratio:.2f}x ({t_spine:.1f} s against {t_uniform:.1f} s)"
    acc = "PASS" if spine["final"] >= uniform["final"] else "MISS"
    t_random = random["sim_s_to_target"]
    faster = t_spine is not None and (t_random is None or t_spine < t_random)
    better = spine["final"] > random["final"]
    return [
        f"- FedSpine reaches the target >= {SPEEDUP}x sooner (simulated) than uniform "
        f"pruning: {speed}",
        f"- FedSpine ends at >= uniform pruning's accuracy: {acc} "
        f"({spine['final']:.3f} against {uniform['final']:.3f})",
        f"- FedSpine (bandit) beats random arms in accuracy and/or time to target: "
        f"{'PASS' if better or faster else 'MISS'} (accuracy {spine['final']:.3f} against "
        f"{random['final']:.3f}; to target {_seconds(t_spine)} against "
        f"{_seconds(t_random)} s)",
    ]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _classes(ratios: dict[str, float]) -> str:
    return ", ".join(f"{c}: {v:.2f}" for c, v in ratios.items()) or "-"


def _table_row(label: str, r: dict) -> str:
    speed = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}"
    return (
        f"| {label} | {r['final']:.3f} | {_seconds(r['sim_s_to_target'])} | "
        f"{r['bytes']:,.0f} | {r['sparsity']:.2f} | {_classes(r['class_ratios'])} | {speed} | "
        f"{r['sim_s']:.1f} |"
    )


HEADER = [
    "| row | final acc | simulated s to target | bytes up+down | avg sparsity | "
    "sparsity per class | deployed decode tokens/s | simulated s, all rounds |",
    "|---|---:|---:|---:|---:|---|---:|---:|",
]


def render(
    results: dict[int, dict[str, dict]],
    model: str,
    rounds: int,
    eval_size: int,
    train_size: int | None,
    machine: str,
    measured: dict[str, float],
) -> str:
    """The Markdown section: the mean table, the per-seed table, the targets, the plot;
    `measured["unpruned"]` is the unpruned model's decode speed."""
    seeds = list(results)
    mean = mean_results(results)
    labels = {row.name: row.label for row in ROWS}
    command = f"edgetune bench fedspine --model {model} --rounds {rounds} --seeds " + ",".join(
        map(str, seeds)
    )
    if eval_size != 100 or train_size is not None:
        command += f" --eval-size {eval_size}"
        command += f" --train-size {train_size}" if train_size is not None else ""
    threads = [r["threads"] for per in results.values() for r in per.values()]
    goals = ", ".join(f"{results[s][FEDIT]['target']:.3f} (seed {s})" for s in seeds)
    lines = [
        "## FedSpine (`edgetune bench fedspine`)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}  ",
        threads_line(threads, "federate process (config.yaml)"),
        f"{CLIENTS} clients of the `{FLEET}` fleet (phones 60 GFLOP/s and 10 Mbit/s up, "
        "rpi5 30 and 20, Orin Nano 600 and 50, AGX Orin 2,500 and 100), 30 % participation, "
        f"Dirichlet 0.5 label skew over BBC News, {rounds} rounds of 3 local steps of batch 4, "
        f"lr 5e-4, held-out accuracy on {eval_size} articles. FedSpine targets "
        f"{TARGET_SPARSITY:.0%} sparsity; uniform pruning runs at FedSpine's average deployed "
        "sparsity of the same seed. Target accuracy = halfway from zero-shot to the best "
        f"final accuracy of the rows: {goals}. Bytes are measured from the serialized payloads.",
        "",
        f"Mean over seeds {', '.join(map(str, seeds))} (time to target: '-' if a seed never "
        "reached it):",
        "",
        *HEADER,
        *(_table_row(labels[name], r) for name, r in mean.items()),
        "",
        "Per seed:",
        "",
        HEADER[0].replace("| row |", "| seed | row |"),
        HEADER[1].replace("|---|", "|---:|---|", 1),
        *(
            f"| {seed} " + _table_row(labels[name], r)
            for seed in seeds
            for name, r in results[seed].items()
        ),
        "",
    ]
    lines += [
        "Deployed decode tokens/s: greedy decoding at batch 1 of each device class's pruned "
        f"model (RUN/classes/), weighted by its devices, median of {SPEED_REPEATS} runs, "
        "measured one model at a time after every row had run; the unpruned model decodes "
        f"{measured['unpruned']:.1f} tokens/s. '-': the row deploys the unpruned model.",
        "",
    ]
    lines += [
        "Targets:",
        "",
        *targets(mean),
        "",
        f"![accuracy vs simulated seconds, seed {seeds[0]}]({PLOT})",
    ]
    return "\n".join(lines)
