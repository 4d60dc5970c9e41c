"""`edgetune bench fed`: federated algorithms side by side on the demo task.

SmolLM2-135M on BBC News, 10 clients, Dirichlet 0.5 label skew, every algorithm with
the same seeds (`--seeds`, default 0 and 1), one run per algorithm and seed (through
`edgetune federate` in its own process, reused when its summary exists): held-out
accuracy (mean of the seeds, each in brackets), bytes per client per round (measured from
the serialized payloads), total uploaded bytes and simulated seconds to reach a target
accuracy, and plots of accuracy against rounds and against cumulative uploaded bytes
(the first seed's runs). `--rows` picks algorithms (FedIT always runs: its accuracy sets
the target and the gaps). FedKSeed runs at the step size tuned for it and with the
default ZO recipe (no step size given: normalised scalars at the recipe's step).
FedProj runs at two K, each checked against its byte targets (16 KB up, 64 KB down per
client per round) and its accuracy gap to FedIT."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetune.bench.markdown import threads_line
from edgetune.runs import RunDir

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PROJ_KS = (3840, 1024)  # FedProj's coefficients per upload: under 16 KB, and 4x fewer
PROJ_SERVER_LR = 1.0  # the unbiased step (see fed/algorithms/fedproj.py)
RUNS = {
    "fedit (fo)": ["--algorithm", "fedit", "--method", "fo", "--lr", "5e-4"],
    "fedit, ranks 2/4/8 (fo)": [
        "--algorithm",
        "fedit",
        "--method",
        "fo",
        "--lr",
        "5e-4",
        "fed.ranks=2,4,8",
    ],
    "fedkseed (zo)": ["--algorithm", "fedkseed", "--method", "zo", "--lr", "2e-3"],
    "fedkseed, ZO recipe (zo)": ["--algorithm", "fedkseed", "--method", "zo"],
    "fedkseed-pro (zo)": ["--algorithm", "fedkseed-pro", "--method", "zo", "--lr", "2e-3"],
    "fwdllm (zo)": ["--algorithm", "fwdllm", "--method", "zo", "--lr", "2e-3"],
    **{
        f"fedproj K={k} (fo)": [
            "--algorithm",
            "fedproj",
            "--method",
            "fo",
            "--lr",
            "5e-4",
            f"fed.proj_k={k}",
            f"fed.server_lr={PROJ_SERVER_LR}",
        ]
        for k in PROJ_KS
    },
    # a mixed fleet: the phones and the Raspberry Pi cannot backprop SmolLM2 and train ZO,
    # then project their update like the others (one step size for every device)
    f"fedproj K={PROJ_KS[0]}, mixed fleet (fo + zo)": [
        "--algorithm",
        "fedproj",
        "--method",
        "auto",
        "--fleet",
        "mixed",
        "--lr",
        "5e-4",
        f"fed.proj_k={PROJ_KS[0]}",
        f"fed.server_lr={PROJ_SERVER_LR}",
    ],
}
KSEED = ("fedkseed (zo)", "fedkseed, ZO recipe (zo)")  # the rows with FedKSeed's targets
# --rows names -> RUNS labels
ROWS = {
    "fedit": "fedit (fo)",
    "fedit-ranks": "fedit, ranks 2/4/8 (fo)",
    "fedkseed": "fedkseed (zo)",
    "fedkseed-recipe": "fedkseed, ZO recipe (zo)",
    "fedkseed-pro": "fedkseed-pro (zo)",
    "fwdllm": "fwdllm (zo)",
    **{f"fedproj-{k}": f"fedproj K={k} (fo)" for k in PROJ_KS},
    "fedproj-mixed": f"fedproj K={PROJ_KS[0]}, mixed fleet (fo + zo)",
}
PROJ_TARGETS = (16_000, 64_000)  # FedProj's bytes up / down per client per round, at most


def common_flags(
    model: str,
    rounds: int,
    clients: int,
    participation: float = 0.3,
    fleet: str = "jetsons",
    local_steps: int = 3,
    eval_size: int = 100,
    seed: int = 0,
) -> list[str]:
    """`edgetune federate` flags the federated benchmarks share (BBC News, Dirichlet 0.5)."""
    return [
        "--model",
        model,
        "--dataset",
        "bbc-news",
        "--clients",
        str(clients),
        "--participation",
        str(participation),
        "--partition",
        "dirichlet:0.5",
        "--fleet",
        fleet,
        "--rounds",
        str(rounds),
        "--local-steps",
        str(local_steps),
        "--batch-size",
        "4",
        "--seed",
        str(seed),
        "data.max_length=64",
        f"data.eval_size={eval_size}",
        "train.eval_batch_size=25",
        "--overwrite",
    ]


def summarise(run: Path, target: float) -> dict[str, Any]:
    """A federate run's accuracies, bytes per client per round, and the bytes, simulated
    seconds and round at which held-out accuracy first reached `target` (None if never)."""
    rd = RunDir(run, resume=True)
    rows = rd.read_metrics()
    clients = [c for c in rd.read_metrics("clients.jsonl") if c["status"] == "ok"]
    reached = next((r for r in rows[1:] if r["eval/accuracy"] >= target), None)
    return {
        "rows": rows,
        "start": rows[0]["eval/accuracy"],
        "final": rows[-1]["eval/accuracy"],
        "best": max(r["eval/accuracy"] for r in rows),
        "up_per_client_round": sum(c["bytes_up"] for c in clients) / max(len(clients), 1),
        "down_per_client_round": sum(c["bytes_down"] for c in clients) / max(len(clients), 1),
        "max_up": max((c["bytes_up"] for c in clients), default=0),
        "max_down": max((c["bytes_down"] for c in clients), default=0),
        "bytes_to_target": reached["total_bytes_up"] if reached else None,
        "sim_s_to_target": reached["total_sim_s"] if reached else None,
        "round_to_target": reached["round"] if reached else None,
        "summary": json.loads((run / "summary.json").read_text()),
        "threads": rd.read_config().get("threads", 0),
    }


def check(rows: list[str] | None) -> list[str]:
    """The labels of the chosen rows (all by default), FedIT first.

    Raises:
        ConfigError: an unknown row, naming the known ones.
    """
    from edgetune.errors import ConfigError

    unknown = [r for r in rows or [] if r not in ROWS]
    if unknown:
        raise ConfigError(
            f"bench fed: unknown row {', '.join(unknown)}; choose from {', '.join(ROWS)}"
        )
    chosen = {"fedit", *(rows or ROWS)}
    return [label for key, label in ROWS.items() if key in chosen]


def run_one(label: str, seed: int, out: Path, model: str, rounds: int, clients: int) -> None:
    """One algorithm and seed in its own process (kept when its summary exists)."""
    if (out / "summary.json").is_file():
        return
    print(f"[bench fed] {label}, seed {seed}", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "edgetune.cli",
        "federate",
        "--out",
        str(out),
        *common_flags(model, rounds, clients, seed=seed),
        *RUNS[label],
    ]
    subprocess.run(cmd, check=True, capture_output=True)


def run(
    model: str,
    rounds: int,
    clients: int,
    output: str,
    plot_dir: str,
    seeds: list[int],
    rows: list[str] | None = None,
    work: str = "runs/bench-fed",
) -> None:
    """Run every chosen algorithm with every seed, then write the table and plots."""
    from edgetune.bench.markdown import machine_line, write_section
    from edgetune.report.plots import save

    labels = check(rows)
    keys = {label: key for key, label in ROWS.items()}
    dirs: dict[str, list[Path]] = {}
    for label in labels:
        dirs[label] = [Path(work) / f"{keys[label]}-s{seed}" for seed in seeds]
        for seed, out in zip(seeds, dirs[label], strict=True):
            run_one(label, seed, out, model, rounds, clients)
    fedit = [summarise(d, 2.0) for d in dirs["fedit (fo)"]]
    start = sum(f["start"] for f in fedit) / len(fedit)
    best = sum(f["best"] for f in fedit) / len(fedit)
    target = round(start + 0.5 * (best - start), 3)
    results = {label: combine([summarise(d, target) for d in ds]) for label, ds in dirs.items()}
    plots = Path(plot_dir)
    for name, fig in figures(results, model, clients).items():
        save(fig, plots / name)
    body = render(
        results, target, model, rounds, clients, machine_line(), plots, Path(output), seeds
    )
    write_section(output, "fed", body)
    print(body)


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from its seeds' runs: accuracies and bytes averaged (each seed's final
    kept), the target reached by every seed or not, the first seed's curve for the plots."""
    n = len(runs)
    out = dict(runs[0])
    for key in ("start", "final", "best", "up_per_client_round", "down_per_client_round"):
        out[key] = sum(r[key] for r in runs) / n
    out["finals"] = [r["final"] for r in runs]
    for key in ("max_up", "max_down"):  # the most any client sent or received in a round
        out[key] = max(r.get(key, 0) for r in runs)
    for key in ("bytes_to_target", "sim_s_to_target", "round_to_target"):
        values = [r[key] for r in runs]
        out[key] = None if None in values else sum(values) / n
    out["threads"] = max(r["threads"] for r in runs)
    return out


def figures(results: dict[str, dict], model: str, clients: int) -> dict[str, Figure]:
    """The two plots (file name -> figure): accuracy against rounds and against
    cumulative uploaded bytes, one line per algorithm, round 0 (zero-shot) included."""
    from edgetune.report.federated import cumulative
    from edgetune.report.plots import metric_figure
    from edgetune.report.run_info import short_name

    series = {label: cumulative(r["rows"]) for label, r in results.items()}
    setting = f"{short_name(model)} on bbc-news, {clients} clients, Dirichlet 0.5"
    return {
        "bench_fed_accuracy_vs_rounds.png": metric_figure(
            series, "eval/accuracy", x="round", title=f"{setting}: federated algorithms"
        ),
        "bench_fed_accuracy_vs_bytes.png": metric_figure(
            series,
            "eval/accuracy",
            x="total_bytes_up",
            logx=True,
            title=f"{setting}: accuracy per uploaded byte",
        ),
    }


def render(
    results: dict[str, dict],
    target: float,
    model: str,
    rounds: int,
    clients: int,
    machine: str,
    plots: Path,
    output: Path,
    seeds: list[int] | None = None,
) -> str:
    """The Markdown section (`seeds`: the runs' seeds, [0] when not given)."""
    seeds = seeds or [0]
    flag = "" if seeds == [0, 1] else f" --seeds {','.join(map(str, seeds))}"
    fedit = results["fedit (fo)"]
    lines = [
        "## Federated algorithms (`edgetune bench fed`)",
        "",
        f"Command: `edgetune bench fed --model {model} --rounds {rounds} --clients {clients}"
        f"{flag}`  ",
        f"Machine: {machine}  ",
        threads_line([r["threads"] for r in results.values()], "simulator run (config.yaml)"),
        f"{clients} clients (Jetson fleet), 30% participation per round, Dirichlet 0.5 label "
        "skew over BBC News, 3 local steps of batch 4 per round, LoRA r=8 on all projections, "
        f"seeds {', '.join(map(str, seeds))} (accuracies are their mean, each seed's final in "
        "brackets; to-target columns are the mean over the seeds when every seed reached "
        "it); held-out accuracy on 100 articles. Bytes are measured from the serialized "
        f"payloads. Target accuracy = halfway from zero-shot to FedIT's best = {target:.3f}.",
        "",
        "| algorithm | start acc | final acc | best acc | bytes up / client / round | "
        "bytes down / client / round | up vs FedIT | bytes up to target | simulated s to target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in results.items():
        ratio = r["up_per_client_round"] / fedit["up_per_client_round"]
        to_bytes = (
            f"{r['bytes_to_target']:,.0f} (round {r['round_to_target']:g})"
            if r["bytes_to_target"] is not None
            else "not reached"
        )
        to_time = f"{r['sim_s_to_target']:.1f}" if r["sim_s_to_target"] is not None else "-"
        finals = " / ".join(f"{f:.2f}" for f in r.get("finals", [r["final"]]))
        lines.append(
            f"| {label} | {r['start']:.3f} | {r['final']:.3f} ({finals}) | {r['best']:.3f} | "
            f"{r['up_per_client_round']:,.0f} | {r['down_per_client_round']:,.0f} | "
            f"1/{1 / ratio:,.0f} | {to_bytes} | {to_time} |"
        )
    lines += [
        *[kseed_line(label, r, fedit, rounds) for label, r in results.items() if label in KSEED],
        *[proj_line(label, r, fedit, rounds) for label, r in results.items() if "fedproj" in label],
        "",
        f"![accuracy vs rounds]({_rel(plots / 'bench_fed_accuracy_vs_rounds.png', output)})",
        f"![accuracy vs bytes]({_rel(plots / 'bench_fed_accuracy_vs_bytes.png', output)})",
    ]
    return "\n".join(lines)


def kseed_line(label: str, r: dict[str, Any], fedit: dict[str, Any], rounds: int) -> str:
    """A FedKSeed row against its targets: the paper's upload and the gap to FedIT."""
    up = r["up_per_client_round"]
    return (
        f"\n{label}: {up:,.0f} bytes up per client per round "
        f"({'under' if up < 18 * 1024 else 'OVER'} the 18 KB of its paper), "
        f"1/{fedit['up_per_client_round'] / up:,.0f} of FedIT's; accuracy gap to FedIT after "
        f"{rounds} rounds: {100 * (fedit['final'] - r['final']):+.1f} points (target: 8)."
    )


def proj_line(label: str, r: dict[str, Any], fedit: dict[str, Any], rounds: int) -> str:
    """A FedProj row against its targets: bytes each way and the gap to FedIT."""
    sent = (r["up_per_client_round"], r["down_per_client_round"])
    met = [
        f"{value:,.0f} bytes {way} ({'within' if value <= bound else 'OVER'} {bound:,})"
        for value, way, bound in zip(sent, ("up", "down"), PROJ_TARGETS, strict=True)
    ]
    most = max(r.get("max_up", 0), r.get("max_down", 0))
    gap = 3 if "mixed" in label else 2
    return (
        f"\n{label}: {', '.join(met)} per client per round on average; the most one client "
        f"sent or received in a round: {r.get('max_up', 0):,.0f} up, "
        f"{r.get('max_down', 0):,.0f} down ({'within' if most <= PROJ_TARGETS[1] else 'OVER'} "
        f"{PROJ_TARGETS[1]:,}); accuracy gap to FedIT after {rounds} rounds: "
        f"{100 * (fedit['final'] - r['final']):+.1f} points (target: {gap})."
    )


def _rel(path: Path, output: Path) -> str:
    try:
        return str(path.resolve().relative_to(output.resolve().parent))
    except ValueError:
        return str(path)
