"""`edgetune bench robust`: what malicious clients cost each aggregation rule.

stories260K on TinyStories (language modelling, held-out eval loss), 10 clients with an
iid split on a fleet that is always reachable (so every round has the same 2 attackers
of 10), FedIT (first-order LoRA), FedKSeed (ZO seed pool) and FedProj (first-order,
coefficients on seeded directions: the rules act on the coefficient vectors). For each
algorithm, each aggregator (mean, median, trimmed-mean, clip-mean) runs once with every
client honest and once per attack of `edgetune.fed.attacks` with 20 % attackers; a cell reports the
final eval loss, its cost against the all-honest run of the same rule, and what the
server did with the attackers' updates (rejected with a logged reason, example count
capped, or accepted and its effect bounded by the rule).

Why this task: stories260K is the only real model small enough to run 52 federations
in minutes on a shared CPU, and a language model's eval loss moves with every update
(an accuracy on a task the model cannot learn would hide attacks). fed.trim=0.2: a
trimmed mean resists only as many attackers as it trims at each end.

The runs share one setup per algorithm (model, data, partitions) and run in this
process: each resets the adapter to its initial tensors and runs the simulator.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from edgetune.bench.markdown import machine_line, write_section
from edgetune.data import DataConfig
from edgetune.fed.algorithms import build_algorithm
from edgetune.fed.algorithms.base import load_trainable, trainable_state
from edgetune.fed.attacks import TARGETS, applies
from edgetune.fed.config import FedConfig, FederateConfig
from edgetune.fed.rounds import InProcessFleet, run_rounds
from edgetune.fed.session import Federation, setup
from edgetune.runs import RunDir
from edgetune.train import OptimConfig, TrainConfig

FRACTION = 0.2
ADAPTIVE_NOTE = (
    " inflate sends 5x its honest update (under the 10x outlier floor); alie (the honest "
    "mean minus one honest standard deviation per coordinate) and ipm (-0.5x the honest "
    "mean) are omniscient: the simulator trains every client first, and they are computed "
    "from the round's honest updates. centered-clip clips each update's distance to the "
    'last aggregate at fed.clip=1.0, and "+ bucket 2" averages shuffled pairs of clients '
    "before the rule."
)
TARGET = 0.02  # the best rule may lose at most 2 % of the honest eval loss to attackers
# algorithm -> (client method, client lr)
SETTINGS = {"fedit": ("fo", 5e-3), "fedkseed": ("zo", 2e-3), "fedproj": ("fo", 5e-3)}
FLEET = (
    "fleet:\n  - {name: lab-board, memory_mb: 8000, gflops: 100, up_mbps: 100, "
    "down_mbps: 100, availability: 1.0, dropout: 0.0}\n"
)


def config(model: str, algorithm: str, rounds: int, clients: int, fleet: Path) -> Any:
    """The honest federation of one algorithm (aggregator and attack set per cell)."""
    method, lr = SETTINGS[algorithm]
    return FederateConfig(
        model=model,
        seed=0,
        data=DataConfig(dataset="tinystories", max_length=32, train_size=600, eval_size=16),
        fed=FedConfig(
            algorithm=algorithm,
            clients=clients,
            participation=1.0,
            partition="iid",
            fleet=str(fleet),
            rounds=rounds,
            local_steps=2,
            method=method,
        ),
        train=TrainConfig(batch_size=4, eval_batch_size=32),
        optim=OptimConfig(lr=lr),
    )


def rules(spec: Any) -> dict[str, tuple[str, int]]:
    """The rows of an algorithm: label -> (fed.aggregator, fed.bucket): each rule it
    implements, and bucketing (buckets of 2) before the whole-update robust rules."""
    out = {rule: (rule, 0) for rule in spec.aggregators}
    for rule in ("median", "centered-clip"):
        if rule in spec.aggregators and "bucket" in spec.settings:
            out[f"{rule} + bucket 2"] = (rule, 2)
    return out


def cell(base: Federation, initial: dict, rule: tuple[str, int], attack: str, out: Path) -> dict:
    """One federation; returns its final eval loss and what happened to the attackers."""
    name, bucket = rule
    trim = 0.2 if name == "trimmed-mean" else FedConfig().trim
    fed_cfg = dataclasses.replace(
        base.cfg.fed, aggregator=name, bucket=bucket, attack=attack, trim=trim
    )
    cfg = dataclasses.replace(base.cfg, fed=fed_cfg)
    fed = dataclasses.replace(base, cfg=cfg)
    load_trainable(fed.adapter, initial)
    algo = build_algorithm(fed)
    run = RunDir(out, overwrite=True)
    run_rounds(fed, algo, InProcessFleet(fed, algo), run)
    bad = [c for c in run.read_metrics("clients.jsonl") if "attack" in c]
    rejected = [c["status"][len("rejected: ") :] for c in bad if c["status"].startswith("rejected")]
    return {
        "loss": run.read_metrics()[-1]["eval/loss"],
        "attacker_updates": len(bad),
        "rejected": rejected,
        "capped": sum(1 for c in bad if "note" in c),
    }


def run(model: str, rounds: int, clients: int, output: str) -> None:
    """Every algorithm x aggregator x attack; writes the table."""
    results: dict[str, dict[str, dict[str, dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-robust-") as tmp:
        work = Path(tmp)
        (work / "fleet.yaml").write_text(FLEET)
        for algorithm in SETTINGS:
            base = config(model, algorithm, rounds, clients, work / "fleet.yaml")
            fed = setup(base)
            initial = trainable_state(fed.adapter)
            attacks = [k for k in TARGETS if applies(k, fed.algorithm.uploads)]
            results[algorithm] = {}
            for rule, setting in rules(fed.algorithm).items():
                results[algorithm][rule] = {}
                for attack in ["", *attacks]:
                    spec = f"{attack}:{FRACTION}" if attack else ""
                    print(f"[bench robust] {algorithm} {rule} {spec or 'honest'}", flush=True)
                    out = work / f"{algorithm}-{rule.replace(' ', '')}-{attack or 'honest'}"
                    results[algorithm][rule][attack or "honest"] = cell(
                        fed, initial, setting, spec, out
                    )
    body = render(results, model, rounds, clients, machine_line())
    write_section(output, "robust", body)
    print(body)


def verdict(r: dict, honest: float) -> str:
    """'rejected', 'capped' or 'bounded' (accepted, effect within the target), or
    'HURT' (accepted and past the target), with the cost."""
    cost = r["loss"] - honest
    if r["attacker_updates"] and len(r["rejected"]) == r["attacker_updates"]:
        what = "rejected"
    elif r["capped"]:
        what = "capped, " + ("bounded" if cost <= TARGET * honest else "HURT")
    else:
        what = "bounded" if cost <= TARGET * honest else "HURT"
    return f"{r['loss']:.3f} ({cost:+.3f}, {what})"


def render(results: dict, model: str, rounds: int, clients: int, machine: str) -> str:
    """The Markdown section."""
    lines = [
        "## Robustness to malicious clients (`edgetune bench robust`)",
        "",
        f"Command: `OMP_NUM_THREADS=1 edgetune bench robust --rounds {rounds} --clients "
        f"{clients}`  ",
        f"Machine: {machine}  ",
        f"{model} on TinyStories (language modelling; 600 training blocks of 32 tokens, "
        f"iid over {clients} clients, all selected every round), {rounds} rounds of 2 local "
        "steps of batch 4, LoRA r=8; FedIT first-order (lr 5e-3), FedKSeed ZO (pool 1024, "
        f"lr 2e-3), FedProj first-order (lr 5e-3, K={FedConfig().proj_k} coefficients). {int(FRACTION * 100)} % of the clients attack (the same seeded ones "
        "every round; `fed.attack=KIND:0.2`), fed.trim=0.2, fed.clip=1.0. Each cell: final "
        "held-out eval loss (lower is better), its change against the all-honest run of the "
        "same rule, and what the server did with the attackers' updates: **rejected** (each "
        "one, with a logged reason in clients.jsonl), **capped** (example count cut to the "
        "partition size), **bounded** (accepted, cost within "
        f"{int(TARGET * 100)} % of the honest loss) or **HURT** (accepted, cost past it).",
        "",
    ]
    for algorithm, by_rule in results.items():
        attacks = [a for a in next(iter(by_rule.values())) if a != "honest"]
        lines += [
            f"**{algorithm}**",
            "",
            "| rule | honest | " + " | ".join(attacks) + " |",
            "|---|---:|" + "---:|" * len(attacks),
        ]
        for rule, cells in by_rule.items():
            honest = cells["honest"]["loss"]
            row = [verdict(cells[a], honest) for a in attacks]
            lines.append(f"| {rule} | {honest:.3f} | " + " | ".join(row) + " |")
        lines += ["", summary(algorithm, by_rule, attacks), ""]
    lines += [
        "Reading notes: a rejected attacker still costs a little (its round averages 8 "
        "clients' data, not 10). FedKSeed learns slowly at this scale (4 rounds of 20 ZO "
        "steps move the loss by about 0.01), so its columns measure damage (an attack "
        "that gets through sends the loss to ~11), not lost progress. lie-count is a sign "
        "flip that claims 10^9 examples: after the cap it equals signflip. FedKSeed's median "
        "and trimmed mean drop traces whose norm is an outlier of the round and clip the "
        "rest to the median norm. A sign-flipped FedIT delta has a typical norm, and honest "
        "deltas of 2 steps of batch 4 are nearly orthogonal to each other (cosine ~0.05), "
        "so no rule here can tell it from an honest one. A direction filter (cosine with "
        "the others' coordinate-wise median) separated most flips in this iid setting "
        "(flipped -0.01..-0.08, honest +0.02..+0.19) but rejected 4 of 8 honest updates on "
        "a 5-client SST-2 run, where small label-skewed batches pull honestly in opposite "
        "directions, so it is not used: the flip is bounded, not removed." + ADAPTIVE_NOTE,
    ]
    return "\n".join(lines)


def summary(algorithm: str, by_rule: dict, attacks: list[str]) -> str:
    """The best rule (smallest worst-case cost) and whether it meets the target."""
    worst = {
        rule: max(cells[a]["loss"] - cells["honest"]["loss"] for a in attacks)
        for rule, cells in by_rule.items()
    }
    best = min(worst, key=lambda r: worst[r])
    honest = by_rule[best]["honest"]["loss"]
    mean = by_rule["mean"]["honest"]["loss"]
    met = "meets" if worst[best] <= TARGET * honest else "MISSES"
    return (
        f"Best rule for {algorithm}: {best}, worst attack costs {worst[best]:+.3f} "
        f"({100 * worst[best] / honest:+.1f} % of its honest loss {honest:.3f}; honest "
        f"mean: {mean:.3f}), which {met} the {int(TARGET * 100)} % target."
    )
