"""`edgetune bench privacy`: what client-level differential privacy (`dp.*`) costs in
model quality, and what it buys against two attacks on the released model.

stories260K, 100 simulated clients, 10 selected a round (the accountant's sampling rate
0.1), delta = 1 / 100, FedIT (first-order LoRA deltas) and FedKSeed (ZO seed scalars):

- **Utility against epsilon.** TinyStories language modelling (held-out eval loss, lower
  is better) at noise multipliers 0 (no DP), 0.5, 0.7, 1.0 and 2.0, each seed given.
- **Canary exposure** (Carlini et al., "The Secret Sharer", USENIX Security 2019). One
  client's data gets `CANARIES` random secrets ("the secret words are w1 w2 w3 w4", four
  words of `WORDS`), each repeated `REPEATS` times. After training, each secret's loss is
  ranked among `CANDIDATES` random secrets of the same form; exposure = log2(candidates +
  1) - log2(rank). Secrets that were never inserted are scored the same way: their
  exposure (about 1.4 on average, by chance) is the level a private model should not
  exceed.
- **Membership inference** (loss threshold, Yeom et al., CSF 2018). SST-2 classification;
  the training rows of the clients that took part are members, the held-out rows are not;
  the score is minus the row's loss, and the AUC says how well it tells them apart (0.5 =
  not at all).

stories260K is the one real model small enough for the 100-client sweep on this CPU; its
classification accuracy stays near chance, so utility is its language-modelling loss. The
runs share one setup per task and run in this process (as `bench robust` does).
"""

from __future__ import annotations

import dataclasses
import math
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from edgetune.bench.markdown import machine_line, write_section
from edgetune.data import DataConfig
from edgetune.data.tasks.base import evaluating
from edgetune.fed.algorithms import build_algorithm
from edgetune.fed.algorithms.base import load_trainable, trainable_state
from edgetune.fed.config import FedConfig, FederateConfig
from edgetune.fed.privacy import DPConfig
from edgetune.fed.rounds import InProcessFleet, run_rounds
from edgetune.fed.session import Federation, privacy_of, setup
from edgetune.runs import RunDir
from edgetune.train import OptimConfig, TrainConfig

CLIENTS = 100
PARTICIPATION = 0.1
NOISES = (0.0, 0.5, 0.7, 1.0, 2.0)
ATTACK_NOISE = 0.7  # the private point of the attack rows
# algorithm -> (client method, client lr, dp.clip): the clip is about the median norm of
# an honest update in these runs (measured over 3 rounds: a FedIT delta of 2 steps, 1.66;
# a FedKSeed client's per-seed scalars, 2.60), so clipping alone changes little and the
# noise is what the rows measure.
SETTINGS = {"fedit": ("fo", 5e-3, 1.5), "fedkseed": ("zo", 2e-3, 2.5)}
POOL = 256  # FedKSeed's pool: the noise goes on every seed, and catch-up replays them all
WORDS = (
    "red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "ball", "cake",
    "fish", "bird", "star", "boat", "hat", "milk", "door", "book", "rain", "frog",
)  # fmt: skip
CANARIES, REPEATS, CANDIDATES = 4, 8, 500
FLEET = (
    "fleet:\n  - {name: lab-board, memory_mb: 8000, gflops: 100, up_mbps: 100, "
    "down_mbps: 100, availability: 1.0, dropout: 0.0}\n"
)


def config(
    model: str, task: str, algorithm: str, rounds: int, seed: int, noise: float, fleet: Path
) -> FederateConfig:
    """One federation of the sweep: `task` is "lm" (TinyStories) or "sst2"."""
    method, lr, clip = SETTINGS[algorithm]
    if task == "lm":
        data = DataConfig(dataset="tinystories", max_length=32, train_size=2000, eval_size=64)
    else:
        data = DataConfig(dataset="sst2", max_length=32, train_size=2000, eval_size=400)
    return FederateConfig(
        model=model,
        seed=seed,
        data=data,
        fed=FedConfig(
            algorithm=algorithm,
            clients=CLIENTS,
            participation=PARTICIPATION,
            partition="iid",
            fleet=str(fleet),
            rounds=rounds,
            local_steps=2,
            method=method,
            pool_size=POOL if algorithm == "fedkseed" else FedConfig.pool_size,
        ),
        train=TrainConfig(batch_size=4, eval_batch_size=32, progress=False),
        optim=OptimConfig(lr=lr),
        dp=DPConfig(noise=noise, clip=clip) if noise else DPConfig(),
    )


def federate(base: Federation, initial: dict, noise: float, out: Path) -> tuple[Any, RunDir]:
    """Run `base`'s federation at `noise` from the `initial` adapter; returns the
    algorithm (its final global state) and the run."""
    method, lr, clip = SETTINGS[base.cfg.fed.algorithm]
    dp = DPConfig(noise=noise, clip=clip) if noise else DPConfig()
    cfg = dataclasses.replace(base.cfg, dp=dp)
    fed = dataclasses.replace(base, cfg=cfg, privacy=privacy_of(cfg))
    load_trainable(fed.adapter, initial)
    algo = build_algorithm(fed)
    run = RunDir(out, overwrite=True)
    run_rounds(fed, algo, InProcessFleet(fed, algo), run)
    load_trainable(fed.adapter, algo.state)
    return algo, run


def losses(fed: Federation, rows: list[dict]) -> list[float]:
    """The task's loss of each row under `fed.adapter`'s model."""
    out: list[float] = []
    with evaluating(fed.adapter.model), torch.no_grad():
        for i in range(0, len(rows), 32):
            batch = fed.task.collate(rows[i : i + 32])
            out += fed.task.example_losses(fed.adapter.model, batch).tolist()
    return out


def secret(rng: random.Random) -> str:
    return "the secret words are " + " ".join(rng.choice(WORDS) for _ in range(4))


def canary_rows(fed: Federation, texts: list[str]) -> list[dict]:
    """One LM block per text (the tokenizer's ids and its end of text)."""
    tok = fed.task.tokenizer
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return [{"input_ids": tok(t)["input_ids"] + eos} for t in texts]


def exposure(fed: Federation, texts: list[str], seed: int) -> list[float]:
    """Each secret's exposure among `CANDIDATES` random secrets of the same form."""
    rng = random.Random(seed)
    candidates = [secret(rng) for _ in range(CANDIDATES)]
    reference = losses(fed, canary_rows(fed, candidates))
    out = []
    for loss in losses(fed, canary_rows(fed, texts)):
        rank = 1 + sum(1 for r in reference if r < loss)
        out.append(math.log2(CANDIDATES + 1) - math.log2(rank))
    return out


def auc(members: list[float], others: list[float]) -> float:
    """P(score of a member > score of a non-member), ties counted half (Mann-Whitney)."""
    ranked = sorted([(s, 1) for s in members] + [(s, 0) for s in others])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mid = (i + j + 1) / 2  # the average 1-based rank of the tie group
        rank_sum += mid * sum(1 for _, m in ranked[i:j] if m)
        i = j
    n1, n0 = len(members), len(others)
    return (rank_sum - n1 * (n1 + 1) / 2) / (n1 * n0)


def utility_rows(model: str, rounds: int, seeds: list[int], work: Path) -> dict:
    """(algorithm, noise) -> {"loss": [per seed], "epsilon": ...}."""
    out: dict = {}
    for algorithm in SETTINGS:
        for seed in seeds:
            base = setup(config(model, "lm", algorithm, rounds, seed, 0.0, work / "fleet.yaml"))
            initial = trainable_state(base.adapter)
            for noise in NOISES:
                print(f"[bench privacy] utility {algorithm} seed {seed} noise {noise}", flush=True)
                _, run = federate(base, initial, noise, work / f"u-{algorithm}-{seed}-{noise}")
                last = run.read_metrics()[-1]
                row = out.setdefault((algorithm, noise), {"loss": [], "epsilon": math.inf})
                row["loss"].append(last["eval/loss"])
                row["start"] = run.read_metrics()[0]["eval/loss"]
                if noise:
                    row["epsilon"] = last["epsilon"]
    return out


def attack_rows(model: str, rounds: int, seed: int, work: Path) -> dict:
    """algorithm -> noise -> canary exposures (inserted, never inserted) and the AUC."""
    rng = random.Random(seed)
    inserted = [secret(rng) for _ in range(CANARIES)]
    control = [secret(rng) for _ in range(CANARIES)]
    out: dict = {}
    for algorithm in SETTINGS:
        lm = setup(config(model, "lm", algorithm, rounds, seed, 0.0, work / "fleet.yaml"))
        lm.partitions[0] = canary_rows(lm, inserted) * REPEATS + lm.partitions[0]
        sst = setup(config(model, "sst2", algorithm, rounds, seed, 0.0, work / "fleet.yaml"))
        lm_initial, sst_initial = trainable_state(lm.adapter), trainable_state(sst.adapter)
        for noise in (0.0, ATTACK_NOISE):
            print(f"[bench privacy] attacks {algorithm} noise {noise}", flush=True)
            _, run = federate(lm, lm_initial, noise, work / f"c-{algorithm}-{noise}")
            cell = {
                "inserted": exposure(lm, inserted, seed),
                "control": exposure(lm, control, seed),
                "canary_client_rounds": sum(
                    1
                    for c in run.read_metrics("clients.jsonl")
                    if c["client"] == 0 and c["status"] == "ok"
                ),
            }
            _, run = federate(sst, sst_initial, noise, work / f"m-{algorithm}-{noise}")
            ok = {c["client"] for c in run.read_metrics("clients.jsonl") if c["status"] == "ok"}
            members = [row for c in sorted(ok) for row in sst.partitions[c]]
            cell["auc"] = auc(
                [-x for x in losses(sst, members)], [-x for x in losses(sst, sst.eval_rows)]
            )
            cell["members"], cell["epsilon"] = len(members), run.read_metrics()[-1].get("epsilon")
            out.setdefault(algorithm, {})[noise] = cell
    return out


def run(model: str, rounds: int, seeds: list[int], output: str) -> None:
    """The utility sweep and the attack rows; writes the section."""
    with tempfile.TemporaryDirectory(prefix="bench-privacy-") as tmp:
        work = Path(tmp)
        (work / "fleet.yaml").write_text(FLEET)
        utility = utility_rows(model, rounds, seeds, work)
        attacks = attack_rows(model, rounds, seeds[0], work)
    body = render(utility, attacks, model, rounds, seeds, machine_line())
    write_section(output, "privacy", body)
    print(body)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def render(
    utility: dict, attacks: dict, model: str, rounds: int, seeds: list[int], machine: str
) -> str:
    """The Markdown section."""
    seed_text = ",".join(str(s) for s in seeds)
    lines = [
        "## Differential privacy: cost and protection (`edgetune bench privacy`)",
        "",
        f"Command: `OMP_NUM_THREADS=1 edgetune bench privacy --rounds {rounds} --seeds "
        f"{seed_text}`  ",
        f"Machine: {machine}  ",
        f"{model}, {CLIENTS} clients (iid), {int(PARTICIPATION * CLIENTS)} selected a round, "
        f"{rounds} rounds of 2 local steps of batch 4, LoRA r=8; central DP (`dp.noise`, "
        f"`dp.clip`: FedIT {SETTINGS['fedit'][2]}, FedKSeed {SETTINGS['fedkseed'][2]} with a "
        f"pool of {POOL} seeds), "
        f"epsilon from Opacus' RDP accountant at delta = 1/{CLIENTS}. Utility: TinyStories "
        "held-out eval loss (64 blocks of 32 tokens; lower is better), mean over the seeds "
        "(each seed in brackets).",
        "",
        "| algorithm | noise | epsilon | eval loss | change vs no DP |",
        "|---|---:|---:|---:|---:|",
    ]
    for algorithm in SETTINGS:
        plain = _mean(utility[(algorithm, 0.0)]["loss"])
        for noise in NOISES:
            row = utility[(algorithm, noise)]
            eps = "no DP" if not noise else f"{row['epsilon']:.2f}"
            each = ", ".join(f"{v:.3f}" for v in row["loss"])
            mean = _mean(row["loss"])
            lines.append(
                f"| {algorithm} | {noise:g} | {eps} | {mean:.3f} ({each}) | {mean - plain:+.3f} |"
            )
    start = utility[("fedit", 0.0)]["start"]
    lines += [
        "",
        f"Eval loss before training: {start:.3f}.",
        "",
        f"Attacks, seed {seeds[0]}: canary exposure (mean of {CANARIES} secrets repeated "
        f"{REPEATS} times in client 0's data, ranked among {CANDIDATES} candidates; never-"
        "inserted secrets beside them) on TinyStories, and the loss-threshold membership-"
        "inference AUC on SST-2 (members: the rows of every client that took part; non-"
        f"members: 400 held-out rows), without DP and at noise {ATTACK_NOISE}.",
        "",
        "| algorithm | noise | epsilon | exposure, inserted | exposure, never inserted "
        "| client 0's rounds | MIA AUC (members) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for algorithm, by_noise in attacks.items():
        for noise, cell in by_noise.items():
            eps = "no DP" if not noise else f"{cell['epsilon']:.2f}"
            lines.append(
                f"| {algorithm} | {noise:g} | {eps} | {_mean(cell['inserted']):.2f} | "
                f"{_mean(cell['control']):.2f} | {cell['canary_client_rounds']} | "
                f"{cell['auc']:.3f} ({cell['members']}) |"
            )
    return "\n".join(lines)
