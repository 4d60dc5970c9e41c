"""The edgetune ClientApp: one device of the federation.

The SuperNode's node config says who the device is, and where its worker listens:

    --node-config "partition-id=3 device=rpi5 worker=/run/edgetune/worker.sock"

`partition-id` picks the device's share of the configured dataset (for trials on one
machine; a real device would point the dataset at its own file); `device` names its
profile (built-in or from the run's fleet YAML), from which the server plans the method;
`worker` is the socket of the device's long-lived edgetune worker (`flower/worker.py`),
which keeps the model and data loaded between messages.

Messages:
- query: keep the run's resolved config (in the context state) and reply with the
  partition id and device;
- train: control (round, method, rank) plus the algorithm's payload. The ClientApp
  hands the payload bytes, with the state the device kept (`ClientState` bytes in the
  context state), to the worker (or, without one, to a `ClientSession` built in this
  process), keeps the state it returns, and replies with the encoded update.

Flower 1.41 runs every message in a fresh `flwr-clientapp` process, so nothing survives
in its memory between rounds: the device's state lives in the Flower context state,
which the SuperNode keeps for the run, and the model in the worker. Without a worker
every message reloads the model (`setup_s` in the reply's metrics measures it). A worker
that cannot be reached makes the reply an error: the server counts the device as lost
for that round.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

CONTROL, RUN, STATE = "edgetune.control", "edgetune.run", "edgetune.client-state"
app = ClientApp()
_SESSIONS: dict[str, Any] = {}


def node_identity(context: Context) -> tuple[int, str]:
    """(partition id, device name) from the node config."""
    config = context.node_config
    if "partition-id" not in config:
        raise ValueError(
            'this SuperNode has no partition-id: start it with --node-config "partition-id=K"'
        )
    return int(config["partition-id"]), str(config.get("device", ""))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Keep the run's config (sent once per node) and say who this device is."""
    partition, device = node_identity(context)
    if CONTROL in msg.content and "config" in msg.content[CONTROL]:
        context.state[RUN] = ConfigRecord({"config": str(msg.content[CONTROL]["config"])})
    return Message(
        RecordDict({CONTROL: ConfigRecord({"partition-id": partition, "device": device})}),
        reply_to=msg,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training, in the worker or in this process."""
    from edgetune.flower.codec import join, records_of

    start = time.perf_counter()
    if RUN not in context.state:
        raise RuntimeError(
            "this node has no run config (the server sends it when it greets a new node); "
            "restart the SuperNode to be greeted again"
        )
    config = str(context.state[RUN]["config"])
    client, _ = node_identity(context)
    control = {k: v for k, v in msg.content[CONTROL].items()}
    payload = join(msg.content)
    kept = context.state[STATE]["state"] if STATE in context.state else None
    worker = context.node_config.get("worker")
    if worker:
        from edgetune.flower.worker import forward

        update, state, metrics = forward(
            str(worker), config, client, control, payload, kept, timeout=3600.0
        )
        setup_s = metrics.pop("setup_s")
    else:
        session = local_session(config)
        setup_s = time.perf_counter() - start
        update, state, metrics = session.train(client, control, payload, kept)
    if state is not None:
        context.state[STATE] = ConfigRecord({"state": state})
    content = RecordDict(records_of(update))
    content["edgetune.metrics"] = MetricRecord(
        {**metrics, "setup_s": setup_s, "handler_s": time.perf_counter() - start}
    )
    return Message(content, reply_to=msg)


def local_session(config_text: str) -> Any:
    """The `ClientSession` of a run's config, built once per process."""
    import hashlib

    from edgetune.fed.client import ClientSession

    key = hashlib.sha256(config_text.encode()).hexdigest()
    if key not in _SESSIONS:
        _SESSIONS.clear()
        _SESSIONS[key] = ClientSession(config_text)
    return _SESSIONS[key]
