"""The in-process federated simulator: real clients' math, a simulated fleet.

Per round: select clients (seeded), drop the unavailable ones, broadcast the algorithm's
payload through the real wire format, run each client's local training on the one shared
model, pass each update through `encode`/`decode` (so bytes are measured, never
estimated), drop clients that vanish mid-round or miss the deadline, cap each update's
example count at its partition's size (`cap_examples`), aggregate, evaluate the global
adapter, and checkpoint. With `fed.attack`, a seeded subset of clients corrupts its
update after local training and before `encode` (`edgetune.fed.attacks`).

Simulated time is deterministic: a client's work is counted in FLOPs (2 * parameters per
token per forward pass, backward counted as two more), divided by its device's GFLOP/s,
plus its bytes over its links. So the same config and seed give the same metrics.

Memory per client: `memory_mb` is the estimate the method choice uses (MEMORY_FACTOR);
`peak_rss_mb` is measured, the process's peak RSS during that client's local training
(the kernel's mark is reset before each client), i.e. the model plus what its method
needs; it goes to clients.jsonl, not to the deterministic metrics.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from edgetune import console
from edgetune.fed.algorithms.base import FedAlgorithm, load_trainable
from edgetune.fed.attacks import attackers, corrupt, parse_attack
from edgetune.fed.fleet import DeviceProfile, method_memory_mb, round_seconds
from edgetune.fed.local import ClientJob
from edgetune.fed.payloads import decode, encode
from edgetune.fed.validate import cap_examples
from edgetune.runs import RunDir, reset_peak_rss, status_mb
from edgetune.zo.seeds import derive_seed, generator

_SELECT_STREAM, _FATE_STREAM = 3, 4


def select_clients(num: int, fraction: float, seed: int, rnd: int) -> list[int]:
    """Clients chosen for round `rnd` (at least one), sorted."""
    count = max(1, round(fraction * num))
    perm = torch.randperm(num, generator=generator(derive_seed(seed, _SELECT_STREAM, rnd)))
    return sorted(perm[:count].tolist())


def work_flops(job: ClientJob, num_params: int, tokens: int) -> float:
    """FLOPs of a client's local round: rows per step x tokens x 2N, x3 with backprop."""
    rows = job.batch_size * (3 if job.method == "fo" else 2 * job.queries)
    return job.steps * rows * tokens * 2.0 * num_params


@dataclass
class RoundLog:
    """What a round left behind (for metrics and the report)."""

    bytes_up: int = 0
    bytes_down: int = 0
    sim_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    clients: list[dict] = field(default_factory=list)


def run_round(
    algo: FedAlgorithm,
    adapter: Any,
    rnd: int,
    jobs: dict[int, ClientJob | None],
    fleet: list[DeviceProfile],
    cfg: Any,
    seed: int,
    num_params: int,
    tokens: int,
) -> tuple[RoundLog, Any]:
    """One round: broadcast, local training, upload, aggregation."""
    log = RoundLog()
    updates = []
    attack = parse_attack(cfg.attack, cfg.algorithm)
    malicious = attackers(attack, cfg.clients, seed)
    for client in select_clients(cfg.clients, cfg.participation, seed, rnd):
        profile, job = fleet[client], jobs.get(client)
        fate = torch.rand(2, generator=generator(derive_seed(seed, _FATE_STREAM, rnd, client)))
        entry = {
            "round": rnd + 1,
            "client": client,
            "device": profile.name,
            "method": job.method if job else None,
            "rank": job.rank if job else None,
            "memory_mb": round(method_memory_mb(num_params, job.method), 1) if job else None,
        }
        if attack is not None and client in malicious:
            entry["attack"] = attack.kind
        if job is not None and job.runtime is not None:
            entry["runtime"] = job.runtime.runtime
        if job is None:
            log.clients.append({**entry, "status": "no method fits its memory"})
            continue
        if fate[0] > profile.availability:
            log.clients.append({**entry, "status": "unavailable"})
            continue
        down = encode(algo.configure(rnd, job.rank, client))
        received = decode(down)
        algo.prepare(adapter, received)  # what this device holds (one model is shared here)
        measured = reset_peak_rss()
        update = algo.client_update(adapter, received, job)
        peak = status_mb("VmHWM") if measured else float("nan")
        if attack is not None and client in malicious:  # after training, before the wire
            update = corrupt(update, attack, seed, rnd, client, cfg.max_abs_scalar)
        up = encode(update)
        seconds = round_seconds(
            profile,
            work_flops(job, num_params, tokens) / 1e9 / cfg.host_gflops,
            len(down),
            len(up),
            cfg.host_gflops,
        )
        log.bytes_down += len(down)
        status = "ok"
        if fate[1] < profile.dropout:
            status = "dropped mid-round"
        elif cfg.deadline_s and seconds > cfg.deadline_s:
            status = "missed the deadline"
        else:
            log.bytes_up += len(up)
            arrived = decode(up)
            note = cap_examples(arrived, len(job.rows))  # the server knows the partition
            if note:
                entry["note"] = note
            updates.append((client, arrived))
            log.losses.append(float(getattr(update, "meta", {}).get("loss", float("nan"))))
            log.sim_s = max(log.sim_s, seconds)
        log.clients.append(
            {
                **entry,
                "status": status,
                "bytes_up": len(up) if status == "ok" else 0,
                "bytes_down": len(down),
                "sim_s": seconds,
                "peak_rss_mb": round(peak, 1),
            }
        )
    if cfg.deadline_s and any(c.get("status") == "missed the deadline" for c in log.clients):
        log.sim_s = cfg.deadline_s
    updates = enough(updates, cfg.min_clients, log.clients)
    result = algo.aggregate(rnd, updates)
    for c in log.clients:
        if c["client"] in result.rejected:
            c["status"] = f"rejected: {result.rejected[c['client']]}"
    load_trainable(adapter, algo.state)
    return log, result


def enough(updates: list, min_clients: int, entries: list[dict]) -> list:
    """`updates`, or none if fewer than `min_clients` arrived (the round then leaves the
    global model as it was, and the clients' entries say why)."""
    if len(updates) >= min_clients:
        return updates
    for entry in entries:
        if entry.get("status") == "ok":
            entry["status"] = f"not aggregated: {len(updates)} updates < min_clients={min_clients}"
    return []


def simulate(
    algo: FedAlgorithm,
    adapter: Any,
    jobs_for: Callable[[int], dict[int, ClientJob | None]],
    fleet: list[DeviceProfile],
    cfg: Any,
    seed: int,
    run: RunDir,
    evaluate: Callable[[], dict[str, float]],
    num_params: int,
    tokens: int,
    start: int = 0,
    on_round: Callable[[int], None] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Run rounds `start`..cfg.rounds-1; returns the running totals. With `progress`,
    one line per round on stderr (see `round_line`)."""
    totals = {"bytes_up": 0.0, "bytes_down": 0.0, "sim_s": 0.0}
    for r in run.read_metrics():
        for key in totals:
            totals[key] = r.get(f"total_{key}", totals[key])
    if start == 0:
        initial = evaluate()
        run.log({"round": 0, **initial})
        scores = ", ".join(f"{k} {v:.4f}" for k, v in initial.items())
        console.status(f"round 0/{cfg.rounds} (before training): {scores}", progress)
    for rnd in range(start, cfg.rounds):
        began = time.perf_counter()
        log, result = run_round(
            algo, adapter, rnd, jobs_for(rnd), fleet, cfg, seed, num_params, tokens
        )
        totals["bytes_up"] += log.bytes_up
        totals["bytes_down"] += log.bytes_down
        totals["sim_s"] += log.sim_s
        for entry in log.clients:
            run.log(entry, file="clients.jsonl")
        losses = [x for x in log.losses if x == x]
        record = {
            "round": rnd + 1,
            "loss": sum(losses) / len(losses) if losses else float("nan"),
            "bytes_up": log.bytes_up,
            "bytes_down": log.bytes_down,
            "sim_s": log.sim_s,
            "accepted": len(result.accepted),
            "rejected": len(result.rejected),
            **{f"total_{k}": v for k, v in totals.items()},
            **evaluate(),
        }
        run.log(record)
        console.status(round_line(record, cfg.rounds), progress)
        run.log({"round": rnd + 1, "round_s": time.perf_counter() - began}, file="timing.jsonl")
        if on_round:
            on_round(rnd + 1)
    return totals


def round_line(record: dict[str, Any], rounds: int) -> str:
    """`round 3/5: 4 accepted, 1 rejected, loss 2.1834, eval/loss 2.0012, 9.6 KB up,
    40.2 KB down` for a round's metrics record."""
    parts = [
        f"round {record['round']}/{rounds}: {record['accepted']} accepted",
        f"{record['rejected']} rejected",
        f"loss {record['loss']:.4f}",
    ]
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("eval/")]
    parts += [f"{record['bytes_up'] / 1e3:.1f} KB up", f"{record['bytes_down'] / 1e3:.1f} KB down"]
    return ", ".join(parts)


def clients_table(run: RunDir) -> list[dict]:
    """Per-client-per-round rows (clients.jsonl)."""
    path = run.path / "clients.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
