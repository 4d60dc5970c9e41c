"""The edgetune ServerApp: the federated rounds of `edgetune federate`, on real nodes.

Run config (`flwr run ... --run-config`): `run-dir` (a run directory whose config.yaml
`edgetune flower run` wrote), `resume` (continue from its last completed round),
`round-timeout` (seconds to wait for replies; late or lost nodes are left out of the
round), `wait-nodes` (seconds to wait for the nodes to connect).

Per round: the same client selection as the simulator (seeded), one message per selected
device that is connected, replies decoded and validated by the same algorithm object,
aggregation, evaluation, checkpoint. A reply that does not decode (`PayloadError`) is
rejected and logged in clients.jsonl, and the round goes on; each update's example
count is capped at the size of the client's partition, which this server knows because
it runs the same seeded `setup` (partitioning) as its devices. Devices choose no method
themselves: the server gives each the method its profile fits (`fed.method`) and its
LoRA rank. Bytes in
metrics are payload bytes (`len(encode(x))`, what the simulator reports); clients.jsonl
also records the bytes Flower carried for each message, framing included.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from edgetune.errors import ConfigError
from edgetune.fed.payloads import PayloadError
from edgetune.fed.validate import cap_examples
from edgetune.flower.client_app import CONTROL
from edgetune.flower.codec import carried_bytes, from_records, payload_bytes, to_records

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls on the SuperLink side."""
    rc = context.run_config
    server = FlowerServer(grid, Path(str(rc["run-dir"])), resume=bool(rc.get("resume", False)))
    server.serve(float(rc.get("round-timeout", 600.0)), float(rc.get("wait-nodes", 120.0)))


def connect(
    grid: Grid,
    nodes: dict[int, tuple[int, str]],
    config_text: str,
    wanted: int,
    wait_s: float,
    refused: set[int],
) -> set[int]:
    """Greet nodes not seen yet: send them the run config, learn their partition id and
    device, and record them in `nodes` (partition id -> (node id, device)); a node that
    restarted comes back under a new id and replaces its old entry. Waits until `wanted`
    partitions are known or `wait_s` passed. Nodes whose greeting failed go into
    `refused` and are not asked again. Returns the partitions greeted."""
    deadline = time.monotonic() + wait_s
    asked: set[int] = set()
    greeted: set[int] = set()
    while True:
        known = {v[0] for v in nodes.values()} | asked | refused
        ids = [n for n in grid.get_node_ids() if n not in known]
        asks = [
            Message(
                RecordDict({CONTROL: ConfigRecord({"config": config_text})}),
                dst_node_id=n,
                message_type="query",
            )
            for n in ids
        ]
        asked.update(ids)
        for reply in grid.send_and_receive(asks, timeout=30) if asks else []:
            if reply.has_error():
                refused.add(reply.metadata.src_node_id)
                print(f"edgetune: node {reply.metadata.src_node_id}: {reply.error.reason}")
                continue
            info = reply.content[CONTROL]
            partition = int(info["partition-id"])
            if not 0 <= partition < wanted:
                refused.add(reply.metadata.src_node_id)
                print(
                    f"edgetune: node {reply.metadata.src_node_id} says partition-id={partition}, "
                    f"outside 0..{wanted - 1} (fed.clients={wanted}); it is left out"
                )
                continue
            nodes[partition] = (reply.metadata.src_node_id, str(info["device"]))
            greeted.add(partition)
        if len(nodes) >= wanted or time.monotonic() > deadline:
            return greeted
        time.sleep(0.5)


class FlowerServer:
    """One federation on a Flower grid: the algorithm, the nodes and the run directory."""

    def __init__(self, grid: Grid, run_dir: Path, resume: bool):
        from edgetune.config import config_from_run, to_dict
        from edgetune.fed.algorithms import ALGORITHMS
        from edgetune.fed.checkpoint import load_round
        from edgetune.recipes.federate import FederateConfig, setup
        from edgetune.runs import RunDir

        self.grid = grid
        self.cfg = cfg = config_from_run(FederateConfig, run_dir, [])
        if cfg.fed.attack:
            raise ConfigError(
                f"fed.attack={cfg.fed.attack} is a simulator option (edgetune federate); a "
                "Flower federation's devices are real: drop fed.attack"
            )
        self.config_text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        self.run = RunDir(run_dir, resume=True)
        self.parts = setup(cfg)
        self.adapter = self.parts["adapter"]
        self.algo = ALGORITHMS[cfg.fed.algorithm](
            cfg.fed, self.adapter, cfg.seed, float(cfg.optim.lr or 1e-3)
        )
        self.done = load_round(self.run, self.algo, self.adapter) if resume else 0
        self.nodes: dict[int, tuple[int, str]] = {}  # partition id -> (node id, device)
        self.refused: set[int] = set()  # nodes whose greeting failed (bad node config)
        self.totals = {"bytes_up": 0.0, "bytes_down": 0.0}
        for r in self.run.read_metrics():
            for key in self.totals:
                self.totals[key] = r.get(f"total_{key}", self.totals[key])

    def plan(self) -> tuple[list[Any], list[str | None], list[int | None]]:
        """Each client's profile (declared by its node), method and LoRA rank."""
        from edgetune.fed.fleet import choose_method, client_ranks, device_profile

        cfg, n = self.cfg, self.cfg.fed.clients
        profiles = [
            device_profile(self.nodes[c][1] if c in self.nodes else "", cfg.fed.fleet, c, n)
            for c in range(n)
        ]
        methods = [choose_method(p, self.parts["num_params"], cfg.fed.method) for p in profiles]
        if cfg.fed.algorithm != "fedit":  # FedKSeed and FwdLLM clients are forward-only
            methods = [None if m is None else "zo" for m in methods]
        return profiles, methods, client_ranks(cfg.fed.ranks, profiles, cfg.peft.rank)

    def evaluate(self) -> dict[str, float]:
        """The global adapter on the held-out rows."""
        from edgetune.train.loop import evaluate

        rows = self.parts["eval_rows"]
        if not rows:
            return {}
        return evaluate(self.adapter, self.parts["task"], rows, self.cfg.train.eval_batch_size)

    def serve(self, round_timeout: float, wait_nodes: float) -> dict[str, Any]:
        """All remaining rounds; returns the summary."""
        from edgetune.fed.checkpoint import save_round
        from edgetune.recipes.federate import summarize

        start = time.perf_counter()
        self.greet(wait_nodes)
        if self.done == 0:
            self.run.log({"round": 0, **self.evaluate()})
        for rnd in range(self.done, self.cfg.fed.rounds):
            self.greet(0.0)
            self.round(rnd, round_timeout)
            save_round(self.run, self.algo, rnd + 1)
        self.parts["methods"] = self.plan()[1]
        totals = {**self.totals, "sim_s": 0.0}
        return summarize(
            self.cfg, self.run, self.adapter, self.parts, totals, start, command="flower run"
        )

    def greet(self, wait_s: float) -> None:
        """Connect new nodes. A node new to this server may hold any model (it restarted,
        or the server did), so FedKSeed sends it every round's scalars: a device skips
        the rounds it already holds."""
        for partition in connect(
            self.grid, self.nodes, self.config_text, self.cfg.fed.clients, wait_s, self.refused
        ):
            getattr(self.algo, "synced", {}).pop(partition, None)

    def round(self, rnd: int, timeout: float) -> None:
        """Send, collect, validate, aggregate, evaluate and log one round."""
        from edgetune.fed.algorithms.base import load_trainable
        from edgetune.fed.simulator import enough, select_clients

        cfg, algo = self.cfg, self.algo
        round_start = time.perf_counter()
        profiles, methods, ranks = self.plan()
        entries: dict[int, dict[str, Any]] = {}
        messages, sent = [], {}
        for client in select_clients(cfg.fed.clients, cfg.fed.participation, cfg.seed, rnd):
            entry = entries[client] = {
                "round": rnd + 1,
                "client": client,
                "device": profiles[client].name,
                "method": methods[client],
                "rank": ranks[client],
            }
            node = self.nodes.get(client)
            if methods[client] is None:
                entry["status"] = "no method fits its memory"
            elif node is None:
                entry["status"] = "no node connected"
            else:
                content = RecordDict(to_records(algo.configure(rnd, ranks[client], client)))
                content[CONTROL] = ConfigRecord(
                    {"round": rnd, "method": methods[client], "rank": ranks[client] or 0}
                )
                msg = Message(content, dst_node_id=node[0], message_type="train", group_id=str(rnd))
                entry.update(
                    status="no reply (node lost or past round-timeout)",
                    bytes_down=payload_bytes(content),
                    carried_down=carried_bytes(msg),
                )
                messages.append(msg)
                sent[node[0]] = client
        updates = []
        for reply in self.grid.send_and_receive(messages, timeout=timeout) if messages else []:
            client = sent.get(reply.metadata.src_node_id)
            if client is not None:
                update = self.receive(reply, entries[client])
                if update is not None:
                    # the server derived the same seeded partitions as its devices (setup)
                    note = cap_examples(update, len(self.parts["partitions"][client]))
                    if note:
                        entries[client]["note"] = note
                    updates.append((client, update))
        updates.sort(key=lambda u: u[0])  # the simulator's order: by client
        updates = enough(updates, cfg.fed.min_clients, list(entries.values()))
        result = algo.aggregate(rnd, updates)
        for client, reason in result.rejected.items():
            entries[client]["status"] = f"rejected: {reason}"
        load_trainable(self.adapter, algo.state)
        up = sum(e.get("bytes_up", 0) for e in entries.values())  # all that arrived
        down = sum(e.get("bytes_down", 0) for e in entries.values())
        self.totals["bytes_up"] += up
        self.totals["bytes_down"] += down
        losses = [float(u.meta.get("loss", float("nan"))) for _, u in updates]
        losses = [x for x in losses if x == x]
        for entry in entries.values():
            self.run.log(entry, file="clients.jsonl")
        self.run.log(
            {
                "round": rnd + 1,
                "loss": sum(losses) / len(losses) if losses else float("nan"),
                "bytes_up": up,
                "bytes_down": down,
                "accepted": len(result.accepted),
                "rejected": len(result.rejected),
                **{f"total_{k}": v for k, v in self.totals.items()},
                **self.evaluate(),
            }
        )
        self.run.log(
            {"round": rnd + 1, "round_s": time.perf_counter() - round_start}, file="timing.jsonl"
        )

    def receive(self, reply: Message, entry: dict[str, Any]) -> Any:
        """Decode one reply into an update (None if it failed), filling its log entry."""
        if reply.has_error():
            entry["status"] = f"error: {reply.error.reason}"
            return None
        try:
            update = from_records(reply.content)
        except PayloadError as exc:  # malformed: this client's problem only
            print(f"edgetune: round {entry['round']}, client {entry['client']}: {exc}")
            entry["status"] = f"rejected: {exc}"
            return None
        entry.update(
            status="ok", bytes_up=payload_bytes(reply.content), carried_up=carried_bytes(reply)
        )
        metrics = reply.content.metric_records.get("edgetune.metrics")
        for key, digits in (("peak_rss_mb", 1), ("train_s", 3), ("setup_s", 3)):
            value = metrics.get(key) if metrics is not None else None
            if isinstance(value, int | float) and math.isfinite(value):  # a peer's claim
                entry[key] = round(float(value), digits)
        return update
