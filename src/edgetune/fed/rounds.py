"""The federated round, written once: the simulator and Flower differ only in transport.

Per round `run_rounds` does, in this order:

1. greet: the transport reports clients that (re)connected (the first greeting comes
   before round 0's evaluation); the algorithm forgets what it knew they held
   (`FedAlgorithm.forget`);
2. select: the seeded selection of `fed.participation` of the clients;
3. plan: the planner gives each selected client its `ClientPlan` (method, rank) from
   the device profiles the transport reports and the history of earlier rounds;
4. configure: the algorithm's payload for each planned client (a client with no method
   that fits its memory is logged and skipped);
5. exchange: the transport delivers the payloads and brings the replies back, decoded,
   filling each client's log entry (status, bytes, times);
6. screen: each arrived update's example count is capped at the client's partition
   size (`cap_examples`); with fewer than `fed.min_clients` updates nothing aggregates;
7. aggregate: the algorithm validates each update against its client's plan, combines
   them and moves the global state, which is loaded into the adapter;
8. evaluate, log (metrics.jsonl, clients.jsonl, timing.jsonl, a progress line) and
   checkpoint (the algorithm's state and the state the transport keeps for its clients).

Round 0 is the evaluation before training. Totals (bytes, simulated seconds) continue
from metrics.jsonl on resume.

Transports: `InProcessFleet` (here) runs every client's real local training on the one
shared model, with the simulated fleet (availability, dropout, deadline, clock) and the
payloads through the real wire format; `flower/server_app.py` has the Flower one (the
Grid). A transport's `round_seconds` is the round's simulated time, or None where there
is no simulated clock (Flower runs on real time; timing.jsonl has it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from edgetune import console
from edgetune.fed.algorithms.base import FedAlgorithm, load_trainable
from edgetune.fed.attacks import attackers, corrupt, parse_attack
from edgetune.fed.checkpoint import save_round
from edgetune.fed.fleet import DeviceProfile, round_seconds
from edgetune.fed.local import ClientJob
from edgetune.fed.payloads import ClientState, Payload, Update, decode, encode
from edgetune.fed.plan import ClientPlan, Outcome, Planner, plan_memory_mb
from edgetune.fed.session import Federation
from edgetune.fed.validate import cap_examples
from edgetune.runs import RunDir, reset_peak_rss, status_mb
from edgetune.train.config import backpropagates
from edgetune.zo.seeds import Stream, generator, stream_seed

CLIENT_STATE = "fleet.client."  # checkpoint key prefix of the simulated clients' states
# What a client reports about its round beside its update (a planner reads them from
# the history): its validation losses (FedSpine: the unpruned model with the global
# slice, its sub-model before training, and after).
REPORTED = ("val_before", "val_pruned", "val_after")


@dataclass
class Send:
    """One payload for one planned client."""

    plan: ClientPlan
    payload: Payload


class Transport(Protocol):
    """Delivers payloads to clients and brings their replies back."""

    def greet(self) -> set[int]:
        """Clients that (re)connected since the last call (their held state is unknown)."""
        ...

    def profiles(self) -> list[DeviceProfile]:
        """Every client's device profile (as the devices declare them)."""
        ...

    def exchange(
        self, rnd: int, sends: Sequence[Send], entries: dict[int, dict[str, Any]]
    ) -> list[tuple[int, Payload]]:
        """Deliver `sends` and return the updates that arrived, decoded, by client;
        fills each client's entry (status, bytes_up, bytes_down, ...)."""
        ...

    def round_seconds(self, entries: dict[int, dict[str, Any]]) -> float | None:
        """The round's simulated duration (None: no simulated clock)."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the transport keeps for its clients, for the checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def select_clients(num: int, fraction: float, seed: int, rnd: int) -> list[int]:
    """Clients chosen for round `rnd` (at least one), sorted."""
    count = max(1, round(fraction * num))
    perm = torch.randperm(num, generator=generator(stream_seed(seed, Stream.SELECT, rnd)))
    return sorted(perm[:count].tolist())


def run_rounds(
    fed: Federation,
    algo: FedAlgorithm,
    transport: Transport,
    run: RunDir,
    *,
    planner: Planner | None = None,
    evaluate: Callable[[bool], dict[str, float]] | None = None,
    start: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Rounds `start`..fed.rounds-1 (see the module docstring); returns the totals.
    The planner and `evaluate(progress)`, which scores the global state after each
    round, are the algorithm's unless given."""
    cfg = fed.cfg
    planner = planner or algo.planner(fed)
    evaluate = evaluate or (lambda progress: algo.evaluate(fed, progress))
    totals = {"bytes_up": 0.0, "bytes_down": 0.0, "sim_s": 0.0}
    for r in run.read_metrics():
        for key in totals:
            totals[key] = r.get(f"total_{key}", totals[key])
    history = run.read_metrics("clients.jsonl")
    for client in sorted(transport.greet()):  # before round 0: the nodes connect first
        algo.forget(client)
    if start == 0:
        initial = evaluate(progress)
        run.log({"round": 0, **initial})
        scores = ", ".join(f"{k} {v:.4f}" for k, v in initial.items() if k.startswith("eval/"))
        console.status(f"round 0/{cfg.fed.rounds} (before training): {scores}", progress)
    for rnd in range(start, cfg.fed.rounds):
        if fed.privacy is not None and fed.privacy.exceeds(rnd + 1):
            console.warn(
                f"round {rnd + 1} would spend epsilon {fed.privacy.epsilon(rnd + 1):.3g} > "
                f"dp.epsilon={fed.privacy.budget:g}; the run stops after {rnd} rounds (the "
                "adapter of the last round is the result)"
            )
            break
        began = time.perf_counter()
        if rnd > start:
            for client in sorted(transport.greet()):
                algo.forget(client)
        entries, record = play_round(fed, algo, transport, planner, rnd, history)
        if "sim_s" not in record:  # no simulated clock: no simulated total either
            totals.pop("sim_s", None)
        for key in totals:
            totals[key] += record[key]
        record.update({f"total_{k}": v for k, v in totals.items()}, **evaluate(progress))
        if fed.privacy is not None:
            record["epsilon"] = fed.privacy.epsilon(rnd + 1)
        for entry in entries:
            run.log(entry, file="clients.jsonl")
        history.extend(entries)
        run.log(record)
        console.status(round_line(record, cfg.fed.rounds), progress)
        run.log({"round": rnd + 1, "round_s": time.perf_counter() - began}, file="timing.jsonl")
        save_round(run, algo, rnd + 1, transport.state_dict())
    return totals


def play_round(
    fed: Federation,
    algo: FedAlgorithm,
    transport: Transport,
    planner: Planner,
    rnd: int,
    history: Sequence[dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Select, plan, configure, exchange, screen and aggregate round `rnd`; returns the
    clients' entries and the round's metrics record (before evaluation)."""
    cfg = fed.cfg
    selected = select_clients(cfg.fed.clients, cfg.fed.participation, cfg.seed, rnd)
    plans = planner.plan(rnd, selected, transport.profiles(), history)
    entries: dict[int, dict[str, Any]] = {}
    sends = []
    for client in selected:
        plan = plans[client]
        entry = entries[client] = {
            "round": rnd + 1,
            "client": client,
            "device": plan.device.name,
            "method": plan.method,
            "rank": plan.rank,
            "memory_mb": plan_memory_mb(plan, fed.num_params, fed.backprop_share),
        }
        if plan.ratio is not None:
            entry.update(ratio=round(plan.ratio, 6), arm=plan.arm)
        link = fed.runtimes[client]
        if link is not None:
            entry["runtime"] = link.runtime
        if plan.method is None:
            entry["status"] = Outcome.NO_METHOD
            continue
        sends.append(Send(plan, algo.configure(rnd, plan)))
    arrived = sorted(transport.exchange(rnd, sends, entries), key=lambda u: u[0])
    for client, update in arrived:  # the server derived the same partitions (setup)
        note = cap_examples(update, len(fed.partitions[client]))
        if note:
            entries[client]["note"] = note
        meta = update.meta if isinstance(update, Update) else {}
        entries[client].update({k: float(meta[k]) for k in REPORTED if k in meta})
    losses = [float(u.meta.get("loss", math.nan)) for _, u in arrived if isinstance(u, Update)]
    losses = [x for x in losses if x == x]
    updates = enough(arrived, cfg.fed.min_clients, list(entries.values()))
    result = algo.aggregate(rnd, updates, plans)
    for client, reason in result.rejected.items():
        entries[client]["status"] = f"rejected: {reason}"
    load_trainable(fed.adapter, algo.state)
    record: dict[str, Any] = {
        "round": rnd + 1,
        "loss": sum(losses) / len(losses) if losses else float("nan"),
        "bytes_up": sum(e.get("bytes_up", 0) for e in entries.values()),
        "bytes_down": sum(e.get("bytes_down", 0) for e in entries.values()),
    }
    seconds = transport.round_seconds(entries)
    if seconds is not None:
        record["sim_s"] = seconds
    record.update(accepted=len(result.accepted), rejected=len(result.rejected))
    return list(entries.values()), record


def enough(updates: list, min_clients: int, entries: list[dict]) -> list:
    """`updates`, or none if fewer than `min_clients` arrived (the round then leaves the
    global model as it was, and the clients' entries say why)."""
    if len(updates) >= min_clients:
        return updates
    for entry in entries:
        if entry.get("status") == Outcome.OK:
            entry["status"] = f"not aggregated: {len(updates)} updates < min_clients={min_clients}"
    return []


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


def work_flops(job: ClientJob, num_params: int, tokens: int, trunk_share: float = 0.0) -> float:
    """FLOPs of a client's local round: rows per step x tokens x 2N, x3 with backprop.

    With a shared trunk (`trunk_share` of the blocks run once per batch, forward only),
    only the rest of the network sees every pass; a runtime device runs whole graphs.
    """
    rows = job.batch_size * (3 if backpropagates(job.method) else 2 * job.zo.queries)
    share = trunk_share if job.runtime is None else 0.0
    per_step = share * job.batch_size + (1.0 - share) * rows
    return job.steps * per_step * tokens * 2.0 * num_params


@dataclass
class Trained:
    """A simulated client's update before it is sent."""

    client: int
    plan: ClientPlan
    job: ClientJob
    down: int  # bytes it received
    update: Payload
    dropped: bool  # its reply will be lost (its device's dropout)


class InProcessFleet:
    """The simulated fleet: real local training in this process, simulated devices.

    Each payload goes through `encode`/`decode` (so bytes are measured, never
    estimated); a client trains on the one shared model from the state its device kept
    (`states`, checkpointed with the round); its update is encoded and decoded back. A
    seeded fate decides whether the client is reachable and whether it vanishes
    mid-round; simulated time is its work in FLOPs at its device's speed plus its bytes
    over its links, and an update later than `fed.deadline_s` is dropped. With
    `fed.attack`, a seeded subset of clients corrupts its update after local training
    and before `encode` (`edgetune.fed.attacks`).

    Memory per client: `memory_mb` is the estimate the method choice used;
    `peak_rss_mb` is measured, the process's peak RSS during that client's local
    training (the kernel's mark is reset before each client); it goes to clients.jsonl,
    not to the deterministic metrics.
    """

    def __init__(self, fed: Federation, algo: FedAlgorithm):
        self.fed, self.algo = fed, algo
        cfg = fed.cfg
        self.attack = parse_attack(cfg.fed.attack)
        self.malicious = attackers(self.attack, cfg.fed.clients, cfg.seed)
        self.states: dict[int, ClientState] = {}

    def greet(self) -> set[int]:
        """Simulated devices never restart."""
        return set()

    def profiles(self) -> list[DeviceProfile]:
        """The configured fleet."""
        return self.fed.fleet

    def exchange(
        self, rnd: int, sends: Sequence[Send], entries: dict[int, dict[str, Any]]
    ) -> list[tuple[int, Payload]]:
        """Every reachable client's local round (see the class docstring). Every client
        trains first; then the attackers corrupt their updates, knowing the honest ones
        (an attack that hides in the honest spread needs them)."""
        trained = [t for t in (self._train(rnd, send, entries) for send in sends) if t]
        honest = [t.update for t in trained if t.client not in self.malicious]
        return [arrived for t in trained if (arrived := self._reply(rnd, t, honest, entries))]

    def _train(self, rnd: int, send: Send, entries: dict[int, dict[str, Any]]) -> Trained | None:
        """The client's local round (None: the client was unavailable)."""
        fed, cfg = self.fed, self.fed.cfg
        plan, client = send.plan, send.plan.client
        entry = entries[client]
        fate = torch.rand(2, generator=generator(stream_seed(cfg.seed, Stream.FATE, rnd, client)))
        if self.attack is not None and client in self.malicious:
            entry["attack"] = self.attack.kind
        if fate[0] > plan.device.availability:
            entry["status"] = Outcome.UNAVAILABLE
            return None
        assert plan.method is not None  # the loop sends only planned methods
        job = fed.job(client, rnd, plan.method)
        down = encode(send.payload)
        measured = reset_peak_rss()
        update, state = self.algo.client_update(
            fed.adapter, decode(down), job, self.states.get(client)
        )
        peak = status_mb("VmHWM") if measured else float("nan")
        if state is not None:  # the device keeps it, even if its reply is lost
            self.states[client] = state
        entry.update(bytes_down=len(down), peak_rss_mb=round(peak, 1))
        return Trained(client, plan, job, len(down), update, bool(fate[1] < plan.device.dropout))

    def _reply(
        self, rnd: int, t: Trained, honest: list[Payload], entries: dict[int, dict[str, Any]]
    ) -> tuple[int, Payload] | None:
        """The client's reply as the server receives it (None: it never arrives)."""
        fed, cfg = self.fed, self.fed.cfg
        update = t.update
        if self.attack is not None and t.client in self.malicious:
            update = corrupt(
                update, self.attack, cfg.seed, rnd, t.client, cfg.fed.max_abs_scalar, honest
            )
        up = encode(update)
        work = work_flops(
            t.job, t.plan.params or fed.num_params, cfg.data.max_length, fed.trunk_share
        )
        seconds = round_seconds(
            t.plan.device, work / 1e9 / cfg.fed.host_gflops, t.down, len(up), cfg.fed.host_gflops
        )
        status = Outcome.OK
        if t.dropped:
            status = Outcome.DROPPED
        elif cfg.fed.deadline_s and seconds > cfg.fed.deadline_s:
            status = Outcome.LATE
        entries[t.client].update(
            status=status, bytes_up=len(up) if status == Outcome.OK else 0, sim_s=seconds
        )
        return (t.client, decode(up)) if status == Outcome.OK else None

    def round_seconds(self, entries: dict[int, dict[str, Any]]) -> float:
        """The slowest arrived client's time, or the deadline if any client missed it."""
        deadline = self.fed.cfg.fed.deadline_s
        if deadline and any(e.get("status") == Outcome.LATE for e in entries.values()):
            return deadline
        arrived = [e["sim_s"] for e in entries.values() if e.get("bytes_up")]
        return max(arrived, default=0.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every client's kept state, as its encoded bytes."""
        return {
            f"{CLIENT_STATE}{client}": torch.frombuffer(bytearray(encode(state)), dtype=torch.uint8)
            for client, state in sorted(self.states.items())
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the clients' states from `state_dict` (other keys are ignored)."""
        self.states = {}
        for key, value in state.items():
            if key.startswith(CLIENT_STATE):
                kept = decode(value.numpy().tobytes())
                assert isinstance(kept, ClientState)
                self.states[int(key[len(CLIENT_STATE) :])] = kept
