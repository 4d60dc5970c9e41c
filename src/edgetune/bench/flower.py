"""`edgetune bench flower`: the Flower path against the in-process simulator.

The same federation (config and seed) runs twice per algorithm: in the simulator
(`edgetune federate`) and on a local Flower federation (a SuperLink and one SuperNode per
client on 127.0.0.1, `edgetune flower run --local N`), each in its own process, one after
the other. Reported: rounds per minute, the added wall time per round and per message,
where a message's time goes on the device (session setup = loading the model and data,
which the node's worker does once; the ClientApp's handler, of which local training),
payload bytes against what Flower
serializes (framing), and whether the final adapters agree.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgetune.bench.fed import common_flags
from edgetune.runs import RunDir
from edgetune.threads import split

ALGORITHMS = {
    "fedit (fo)": ["--algorithm", "fedit", "--method", "fo", "--lr", "5e-4"],
    "fedkseed (zo)": ["--algorithm", "fedkseed", "--method", "zo", "--lr", "2e-3"],
}


def _edgetune(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edgetune.cli", *args], check=True)
    return time.perf_counter() - start


def _rounds(run: Path) -> list[float]:
    rows = RunDir(run, resume=True).read_metrics("timing.jsonl")
    return [r["round_s"] for r in rows if "round_s" in r]


def measure(model: str, rounds: int, clients: int, root: Path) -> dict[str, dict[str, Any]]:
    """Run every algorithm on both paths; returns the figures by algorithm."""
    from safetensors.torch import load_file

    out = {}
    for name, flags in ALGORITHMS.items():
        tag = name.split()[0]
        sim_dir, fl_dir = root / f"{tag}-sim", root / f"{tag}-flower"
        common = [*common_flags(model, rounds, clients, 1.0, "jetson-agx-orin", 2, 50), *flags]
        sim_wall = _edgetune(["federate", *common, "--out", str(sim_dir)])
        fl_wall = _edgetune(
            ["flower", "run", *common, "--out", str(fl_dir), "--local", str(clients)]
            + ["--home", str(root / "flower-home")]
        )
        sim_rounds, fl_rounds = _rounds(sim_dir), _rounds(fl_dir)
        ok = [
            c
            for c in RunDir(fl_dir, resume=True).read_metrics("clients.jsonl")
            if c["status"] == "ok"
        ]
        a = load_file(sim_dir / "adapter" / "adapter_model.safetensors")
        b = load_file(fl_dir / "adapter" / "adapter_model.safetensors")
        sim_round, fl_round = statistics.median(sim_rounds), statistics.median(fl_rounds)
        out[name] = {
            "sim_round_s": sim_round,
            "flower_round_s": fl_round,
            "sim_rpm": 60 / sim_round,
            "flower_rpm": 60 / fl_round,
            "overhead_round_s": fl_round - sim_round,
            "overhead_message_s": (fl_round - sim_round) / clients,
            "setup_s": statistics.median(c["setup_s"] for c in ok),
            "handler_s": statistics.median(c["handler_s"] for c in ok),
            "train_s": statistics.median(c["train_s"] for c in ok),
            "payload_up": statistics.median(c["bytes_up"] for c in ok),
            "carried_up": statistics.median(c["carried_up"] for c in ok),
            "payload_down": statistics.median(c["bytes_down"] for c in ok),
            "carried_down": statistics.median(c["carried_down"] for c in ok),
            "sim_wall_s": sim_wall,
            "flower_wall_s": fl_wall,
            "max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
            "sim_threads": RunDir(sim_dir, resume=True).read_config()["threads"],
            "node_threads": split(RunDir(fl_dir, resume=True).read_config()["threads"], clients),
        }
    return out


def _distinct(results: dict[str, dict[str, Any]], key: str) -> str:
    return " / ".join(str(n) for n in sorted({r[key] for r in results.values()}))


def render(
    results: dict[str, dict[str, Any]], model: str, rounds: int, clients: int, machine: str
) -> str:
    """The Markdown section."""
    lines = [
        "## Flower against the in-process simulator (`edgetune bench flower`)",
        "",
        f"Command: `edgetune bench flower --model {model} --rounds {rounds} --clients {clients}`  ",
        f"Machine: {machine}  ",
        f"Threads: {_distinct(results, 'sim_threads')} in each simulator process; "
        f"{_distinct(results, 'node_threads')} in each of the {clients} SuperNodes (their "
        "share of the run's `threads`)  ",
        f"Task: BBC News, {clients} clients (one SuperNode each, all on this machine), every "
        "client every round, 2 local steps of batch 4; medians over rounds / messages.",
        "",
        "| algorithm | simulator s/round | Flower s/round | rounds/min (sim / Flower) | "
        "added s per round | added s per message | device: setup s / handler s (training s) | "
        "payload up B (Flower carried) | payload down B (Flower carried) | max abs diff of adapters |",
        "|---|---:|---:|---|---:|---:|---|---|---|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['sim_round_s']:.1f} | {r['flower_round_s']:.1f} | "
            f"{r['sim_rpm']:.2f} / {r['flower_rpm']:.2f} | {r['overhead_round_s']:.1f} | "
            f"{r['overhead_message_s']:.1f} | {r['setup_s']:.1f} / {r['handler_s']:.1f} "
            f"({r['train_s']:.1f}) | "
            f"{r['payload_up']:,.0f} ({r['carried_up']:,.0f}) | "
            f"{r['payload_down']:,.0f} ({r['carried_down']:,.0f}) | {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def run(model: str, rounds: int, clients: int, output: str) -> None:
    """Measure and write the section into `output`."""
    from edgetune.bench.markdown import machine_line, write_section

    results = measure(model, rounds, clients, Path("runs/bench-flower"))
    (Path("runs/bench-flower") / "results.json").write_text(json.dumps(results, indent=2))
    body = render(results, model, rounds, clients, machine_line())
    write_section(output, "flower", body)
    print(body)
