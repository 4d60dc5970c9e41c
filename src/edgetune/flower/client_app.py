"""The edgetune ClientApp: one device of the federation.

The SuperNode's node config says who the device is:

    --node-config "partition-id=3 device=rpi5"

`partition-id` picks the device's share of the configured dataset (for trials on one
machine; a real device would point the dataset at its own file); `device` names its
profile (built-in or from the run's fleet YAML), from which the server chooses the method.

Messages:
- query: keep the run's resolved config (in the context state) and reply with the
  partition id and device;
- train: control (round, method, rank) plus the algorithm's payload; run `client_update` of the same algorithm object the simulator uses and reply
  with the encoded update.

Flower 1.41 runs every message in a fresh `flwr-clientapp` process (it pulls one task
and exits, in both isolation modes), so nothing survives in memory between rounds. What a
device must remember (FedKSeed: the global model it has caught up to and Pro's seed
magnitudes; FwdLLM: the previous broadcast, for its prior) lives in the Flower context
state, which the SuperNode keeps for the run; the base model is reloaded from the local
fp32 cache (`setup_s` in the reply's metrics measures it). Within one process the
session is built once.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edgetune.flower.codec import from_records, to_records

CONTROL, HELD, RUN = "edgetune.control", "edgetune.held", "edgetune.run"
PREV = "edgetune.previous-broadcast"
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
    """One round of local training."""
    from edgetune.fed.algorithms.base import trainable_state
    from edgetune.recipes.federate import client_job
    from edgetune.runs import peak_rss_mb

    start = time.perf_counter()
    control = msg.content[CONTROL]
    if RUN not in context.state:
        raise RuntimeError(
            "this node has no run config (the server sends it when it greets a new node); "
            "restart the SuperNode to be greeted again"
        )
    cfg, parts, algo = session(str(context.state[RUN]["config"]))
    setup_s = time.perf_counter() - start
    client, _ = node_identity(context)
    rank = int(control["rank"]) or None
    job = client_job(cfg, parts, client, int(control["round"]), str(control["method"]), rank)
    payload = from_records(msg.content)
    adapter = parts["adapter"]
    if hasattr(algo, "catch_up"):  # FedKSeed: bring the held model up to this round
        restore_held(algo, adapter, context)
        algo.catch_up(adapter, payload)
        context.state[HELD] = ArrayRecord(
            torch_state_dict={k: v.contiguous() for k, v in trainable_state(adapter).items()}
        )
        context.state[HELD + ".meta"] = ConfigRecord(
            {"round": algo.client_round, "magnitude-rounds": algo.magnitude_rounds}
        )
        context.state[HELD + ".magnitude"] = ArrayRecord(
            torch_state_dict={"magnitude": algo.magnitude}
        )
    if hasattr(algo, "set_prior"):  # FwdLLM: steer by the step since the last broadcast
        remember_broadcast(algo, payload, int(control["round"]), context)
    update = algo.client_update(adapter, payload, job)
    content = RecordDict(to_records(update))
    content["edgetune.metrics"] = MetricRecord(
        {
            "train_s": time.perf_counter() - start,
            "setup_s": setup_s,
            "peak_rss_mb": peak_rss_mb(),
        }
    )
    return Message(content, reply_to=msg)


def remember_broadcast(algo: Any, payload: Any, rnd: int, context: Context) -> None:
    """Set the prior from the broadcast this device got last round, keep this one."""
    held = None
    if PREV in context.state and int(context.state[PREV + ".meta"]["round"]) == rnd - 1:
        held = context.state[PREV].to_torch_state_dict()
    algo.set_prior(payload.tensors, held)
    context.state[PREV] = ArrayRecord(
        torch_state_dict={k: v.contiguous() for k, v in payload.tensors.items()}
    )
    context.state[PREV + ".meta"] = ConfigRecord({"round": rnd})


def restore_held(algo: Any, adapter: Any, context: Context) -> None:
    """Load the model this device holds (the initial adapter if it holds none)."""
    from edgetune.fed.algorithms.base import load_trainable

    if HELD not in context.state:
        load_trainable(adapter, algo.initial)
        algo.client_round, algo.magnitude_rounds = 0, 0
        algo.magnitude.zero_()
        return
    held = context.state[HELD].to_torch_state_dict()
    load_trainable(adapter, held)
    meta = context.state[HELD + ".meta"]
    algo.client_round = int(meta["round"])
    algo.magnitude_rounds = int(meta["magnitude-rounds"])
    algo.magnitude = context.state[HELD + ".magnitude"].to_torch_state_dict()["magnitude"].double()


def session(config_text: str) -> tuple[Any, dict[str, Any], Any]:
    """(config, setup parts, algorithm) for a run's config, built once per process."""
    from edgetune.config import build
    from edgetune.fed.algorithms import ALGORITHMS
    from edgetune.recipes.federate import FederateConfig, setup

    key = hashlib.sha256(config_text.encode()).hexdigest()
    if key not in _SESSIONS:
        _SESSIONS.clear()
        cfg = build(FederateConfig, yaml.safe_load(config_text))
        parts = setup(cfg)
        algo = ALGORITHMS[cfg.fed.algorithm](
            cfg.fed, parts["adapter"], cfg.seed, float(cfg.optim.lr or 1e-3)
        )
        _SESSIONS[key] = (cfg, parts, algo)
    return _SESSIONS[key]
