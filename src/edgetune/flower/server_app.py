"""The edgetune ServerApp: the federated rounds of `edgetune federate`, on real nodes.

Run config (`flwr run ... --run-config`): `run-dir` (a run directory whose config.yaml
`edgetune flower run` wrote), `resume` (continue from its last completed round),
`round-timeout` (seconds to wait for replies; late or lost nodes are left out of the
round), `wait-nodes` (seconds to wait for the nodes to connect).

The rounds are `fed/rounds.py`'s, the simulator's own loop; `FlowerTransport` is the
Flower transport: it greets new nodes (sends them the run config, learns their partition
id and device, and reports them so the algorithm forgets what it knew they held), sends
one message per planned client that is connected (control: round, method, rank; then the
algorithm's payload) and decodes the replies. A reply that does not decode
(`PayloadError`) or reports an error is logged in clients.jsonl and the round goes on.
The server runs the same seeded `setup` as its devices, so it knows each partition's
size (to cap claimed example counts). Devices choose no method themselves: the planner
gives each the method its declared profile fits and its LoRA rank. Bytes in metrics are
payload bytes (`len(encode(x))`, what the simulator reports); clients.jsonl also records
the bytes Flower carried for each message, framing included.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from edgetune.errors import EdgetuneError
from edgetune.fed.payloads import PayloadError
from edgetune.fed.plan import Outcome
from edgetune.flower.client_app import CONTROL
from edgetune.flower.codec import carried_bytes, from_records, payload_bytes, to_records
from edgetune.flower.local import SERVER_ERROR

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls on the SuperLink side."""
    rc = context.run_config
    run_dir = Path(str(rc["run-dir"]))
    try:
        serve(
            grid,
            run_dir,
            bool(rc.get("resume", False)),
            float(rc.get("round-timeout", 600.0)),
            float(rc.get("wait-nodes", 120.0)),
        )
    except Exception as exc:
        leave_error(run_dir, exc)
        raise


def leave_error(run_dir: Path, exc: Exception) -> None:
    """Write why the ServerApp stopped into the run directory, where `launch` reads it
    (`flwr run` itself exits 0): a user's error as its message, a bug with its traceback."""
    user = isinstance(exc, EdgetuneError)
    text = str(exc) if user else "".join(traceback.format_exception(exc))
    if run_dir.is_dir():
        (run_dir / SERVER_ERROR).write_text(text)


# How often the server asks the SuperLink for replies. Flower's own send_and_receive
# sleeps 3 s between pulls, which alone added up to 3 s to every round; a pull is one
# small request to the SuperLink.
PULL_INTERVAL_S = 0.1


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Push `messages` and pull their replies every PULL_INTERVAL_S until all arrived or
    `timeout` seconds passed (late replies are left out)."""
    if not messages:
        return []
    waiting = {m for m in grid.push_messages(messages) if m}
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while waiting and time.monotonic() < deadline:
        got = list(grid.pull_messages(waiting))
        replies.extend(got)
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if waiting:
            time.sleep(PULL_INTERVAL_S)
    return replies


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
        for reply in send_and_receive(grid, asks, timeout=30.0):
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


class FlowerTransport:
    """The Flower Grid as a round transport (see the module docstring)."""

    def __init__(self, grid: Grid, fed: Any, config_text: str, timeout: float, wait_s: float):
        self.grid, self.fed, self.config_text = grid, fed, config_text
        self.timeout, self.wait_s = timeout, wait_s
        self.nodes: dict[int, tuple[int, str]] = {}  # partition id -> (node id, device)
        self.refused: set[int] = set()  # nodes whose greeting failed (bad node config)

    def greet(self) -> set[int]:
        """Connect new nodes (waiting up to `wait-nodes` the first time); a node new to
        this server may hold any state (it restarted, or the server did)."""
        greeted = connect(
            self.grid,
            self.nodes,
            self.config_text,
            self.fed.cfg.fed.clients,
            self.wait_s,
            self.refused,
        )
        self.wait_s = 0.0
        return greeted

    def profiles(self) -> list[Any]:
        """Each client's profile as its node declared it (the fleet's, if none)."""
        from edgetune.fed.fleet import device_profile

        cfg, n = self.fed.cfg, self.fed.cfg.fed.clients
        return [
            device_profile(self.nodes[c][1] if c in self.nodes else "", cfg.fed.fleet, c, n)
            for c in range(n)
        ]

    def exchange(
        self, rnd: int, sends: Sequence[Any], entries: dict[int, dict[str, Any]]
    ) -> list[tuple[int, Any]]:
        """One message per connected planned client; the decoded replies by client."""
        messages, sent = [], {}
        for send in sends:
            client = send.plan.client
            node = self.nodes.get(client)
            if node is None:
                entries[client]["status"] = "no node connected"
                continue
            content = RecordDict(to_records(send.payload))
            content[CONTROL] = ConfigRecord({"round": rnd, **send.plan.control()})
            msg = Message(content, dst_node_id=node[0], message_type="train", group_id=str(rnd))
            entries[client].update(
                status="no reply (node lost or past round-timeout)",
                bytes_down=payload_bytes(content),
                carried_down=carried_bytes(msg),
            )
            messages.append(msg)
            sent[node[0]] = client
        arrived = []
        for reply in send_and_receive(self.grid, messages, self.timeout):
            client = sent.get(reply.metadata.src_node_id)
            if client is not None:
                update = receive(reply, entries[client])
                if update is not None:
                    arrived.append((client, update))
        return arrived

    def round_seconds(self, entries: dict[int, dict[str, Any]]) -> None:
        """No simulated clock: Flower rounds take real time (timing.jsonl)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the devices keep their own state (in their Flower context)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (see `state_dict`)."""


def receive(reply: Message, entry: dict[str, Any]) -> Any:
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
        status=Outcome.OK, bytes_up=payload_bytes(reply.content), carried_up=carried_bytes(reply)
    )
    metrics = reply.content.metric_records.get("edgetune.metrics")
    for key, digits in (("peak_rss_mb", 1), ("train_s", 3), ("setup_s", 3), ("handler_s", 3)):
        value = metrics.get(key) if metrics is not None else None
        if isinstance(value, int | float) and math.isfinite(value):  # a peer's claim
            entry[key] = round(float(value), digits)
    return update


def serve(grid: Grid, run_dir: Path, resume: bool, timeout: float, wait_s: float) -> dict:
    """Every remaining round of the run in `run_dir` on `grid`; returns the summary."""
    from edgetune.config import config_from_run, to_dict
    from edgetune.fed.algorithms import build_algorithm
    from edgetune.fed.checkpoint import load_round
    from edgetune.fed.config import FederateConfig, check_read_by_flower
    from edgetune.fed.rounds import run_rounds
    from edgetune.fed.session import config_text, setup, summarize
    from edgetune.runs import RunDir

    start = time.perf_counter()
    cfg = config_from_run(FederateConfig, run_dir, [])
    check_read_by_flower(cfg)  # `flower run` refused these before launch; `flwr run` did not
    run = RunDir(run_dir, resume=True)
    fed = setup(cfg)
    algo = build_algorithm(fed)
    transport = FlowerTransport(grid, fed, config_text(cfg), timeout, wait_s)
    done = load_round(run, algo, fed.adapter, transport) if resume else 0
    run.track(cfg.report_to, to_dict(cfg))  # after the resume dropped the rounds it redoes
    planner = algo.planner(fed)
    totals = run_rounds(fed, algo, transport, run, planner=planner, start=done)
    totals.setdefault("sim_s", 0.0)
    methods = planner.methods(transport.profiles())
    return summarize(fed, run, totals, methods, start, command="flower run", algo=algo)
