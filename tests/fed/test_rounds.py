"""The round loop on its own: a planner that changes a client's rank between rounds,
the simulated clients' kept state through the checkpoint, and settings a federated run
would ignore refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from edgetune.config import resolve_config, to_dict
from edgetune.errors import ConfigError
from edgetune.fed.algorithms import build_algorithm
from edgetune.fed.algorithms.base import trainable_state
from edgetune.fed.checkpoint import load_round
from edgetune.fed.config import FederateConfig
from edgetune.fed.plan import ClientPlan, StaticPlanner
from edgetune.fed.rounds import InProcessFleet, run_rounds
from edgetune.fed.session import setup
from edgetune.fed.shapes import lora_axes
from edgetune.runs import RunDir
from edgetune.train.memory import method_memory_mb

FLEET = "fleet:\n  - {name: board, memory_mb: 48000, gflops: 100, up_mbps: 10, down_mbps: 10}\n"


@pytest.fixture
def config(stories260k_path, shared_data, tmp_path):
    del shared_data
    (tmp_path / "fleet.yaml").write_text(FLEET)

    def make(**flags):
        base = {
            "model": str(stories260k_path),
            "out": str(tmp_path / "run"),
            "data.dataset": "sst2",
            "fed.clients": 2,
            "fed.participation": 1.0,
            "fed.rounds": 2,
            "fed.local_steps": 2,
            "fed.fleet": str(tmp_path / "fleet.yaml"),
            "train.batch_size": 4,
            "train.progress": False,
            "peft.rank": 4,
            **flags,
        }
        overrides = ["data.train_size=40", "data.eval_size=8", "data.max_length=32"]
        return resolve_config(FederateConfig, None, overrides, base)

    return make


class RankRamp:
    """Round 1: every client at rank 2; round 2: client 0 at the global rank."""

    def __init__(self, inner):
        self.inner = inner

    def plan(self, rnd, clients, profiles, history):
        plans = self.inner.plan(rnd, clients, profiles, history)
        rank = {0: 2, 1: 2} if rnd == 0 else {0: None, 1: 2}
        return {c: dataclasses.replace(p, rank=rank[c]) for c, p in plans.items()}


def _tail(state, axes, name):
    """The rank components 2.. of a LoRA tensor."""
    return state[name].narrow(axes[name]["rank"], 2, state[name].shape[axes[name]["rank"]] - 2)


def test_a_planner_may_change_a_clients_rank_between_rounds(config, tmp_path):
    # Prepare: FedIT fo clients planned at rank 2, then client 0 at the global rank 4
    cfg = config(**{"fed.method": "fo", "optim.lr": 5e-3})
    fed = setup(cfg)
    algo = build_algorithm(fed)
    axes = lora_axes(fed.adapter)
    lora = [n for n in axes if "rank" in axes[n]]
    start = trainable_state(fed.adapter)
    run = RunDir(tmp_path / "run", overwrite=True)
    planner = RankRamp(StaticPlanner(fed.cfg.fed, fed.cfg.peft.rank, fed.num_params, False))
    fleet = InProcessFleet(fed, algo)
    # Execute: the first round only
    fed.cfg = dataclasses.replace(fed.cfg, fed=dataclasses.replace(fed.cfg.fed, rounds=1))
    run_rounds(fed, algo, fleet, run, planner=planner)
    after_one = {k: v.clone() for k, v in algo.state.items()}
    fed.cfg = dataclasses.replace(fed.cfg, fed=dataclasses.replace(fed.cfg.fed, rounds=2))
    run_rounds(fed, algo, fleet, run, planner=planner, start=1)
    # Assert: every update arrived at the rank planned for it and was accepted ...
    entries = run.read_metrics("clients.jsonl")
    assert [(e["round"], e["client"], e["rank"], e["status"]) for e in entries] == [
        (1, 0, 2, "ok"),
        (1, 1, 2, "ok"),
        (2, 0, None, "ok"),
        (2, 1, 2, "ok"),
    ]
    # ... round 1 moved only the first two components of every LoRA tensor (the tail no
    # client held stays exactly as initialised), round 2's full-rank client moved the tail
    for name in lora:
        assert torch.equal(_tail(after_one, axes, name), _tail(start, axes, name))
    moved = [not torch.equal(_tail(algo.state, axes, n), _tail(after_one, axes, n)) for n in lora]
    assert all(moved)
    head_moved = [
        not torch.equal(
            after_one[n].narrow(axes[n]["rank"], 0, 2), start[n].narrow(axes[n]["rank"], 0, 2)
        )
        for n in lora
        if "lora_A" in n
    ]
    assert all(head_moved)


def test_an_update_of_other_shapes_than_planned_is_rejected(config):
    cfg = config(**{"fed.method": "fo"})
    fed = setup(cfg)
    algo = build_algorithm(fed)
    profile = fed.fleet[0]
    full = algo.configure(0, ClientPlan(0, profile, "fo", None))
    full.num_examples = 4
    result = algo.aggregate(0, [(0, full)], {0: ClientPlan(0, profile, "fo", 2)})
    assert result.accepted == []
    assert "expected (2, " in result.rejected[0] or ", 2) torch.float32" in result.rejected[0]


def test_simulated_clients_keep_their_state_through_the_checkpoint(config, tmp_path):
    # Prepare / Execute: two FedKSeed rounds, then a fresh fleet restored from round 2
    cfg = config(**{"fed.algorithm": "fedkseed", "fed.method": "zo", "fed.pool_size": 64})
    fed = setup(cfg)
    algo = build_algorithm(fed)
    fleet = InProcessFleet(fed, algo)
    run = RunDir(tmp_path / "run", overwrite=True)
    run.write_config(to_dict(fed.cfg))
    run_rounds(fed, algo, fleet, run)
    restored_algo = build_algorithm(fed)
    restored = InProcessFleet(fed, restored_algo)
    done = load_round(RunDir(tmp_path / "run", resume=True), restored_algo, fed.adapter, restored)
    # Assert: both clients' held models (caught up to round 1) and rounds came back
    assert done == 2 and sorted(restored.states) == [0, 1]
    for client, state in fleet.states.items():
        back = restored.states[client]
        assert back.values == state.values == {"round": 1.0}
        assert back.tensors.keys() == state.tensors.keys()
        assert all(torch.equal(back.tensors[k], v) for k, v in state.tensors.items())


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"train.steps": 999}, "train.steps=999 is not read by a federated run"),
        ({"zo.optimizer": "adam"}, "zo.optimizer='adam' is not read by a federated run"),
        ({"optim.schedule": "cosine"}, "optim.schedule='cosine' is not read"),
        ({"fed.pool_size": 64}, "fed.pool_size=64 is not read by fed.algorithm=fedit"),
        (
            {"fed.server_optimizer": "fedadam", "fed.algorithm": "fedkseed"},
            "read with fed.algorithm=fedit | fedspine | fwdllm",
        ),
        ({"fed.trim": 0.2}, "fed.trim=0.2 is not read"),
        ({"zo.max_queries": 4}, "read only by fwdllm"),
        ({"optim.name": "sgd", "fed.method": "zo"}, "optim.name='sgd' is a first-order setting"),
        ({"optim.weight_decay": 0.1}, "optim.weight_decay=0.1 applies to first-order clients only"),
    ],
)
def test_settings_a_federated_run_would_ignore_are_refused(config, flags, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("(", r"\(")):
        config(**flags)


def test_settings_that_are_read_are_accepted(config):
    cfg = config(**{"fed.algorithm": "fwdllm", "fed.method": "zo", "zo.max_queries": 4})
    assert cfg.zo.max_queries == 4
    cfg = config(
        **{
            "fed.aggregator": "trimmed-mean",
            "fed.trim": 0.2,
            "optim.weight_decay": 0.1,
            "fed.method": "fo",
        }
    )
    assert cfg.fed.trim == 0.2


def test_auto_gives_first_order_to_a_device_that_fits_backprop_through_the_top_blocks(
    config, tmp_path
):
    # Prepare: a device whose memory lies between first-order on the top block and on all
    fed = setup(config())
    layers = fed.adapter.model.get_base_model().config.num_hidden_layers
    top, full = (method_memory_mb(fed.num_params, "fo", s) for s in (1 / layers, 1.0))
    assert top < full
    board = (
        f"fleet:\n  - {{name: board, memory_mb: {(top + full) / 2}, gflops: 10, "
        "up_mbps: 10, down_mbps: 10}\n"
    )
    (tmp_path / "board.yaml").write_text(board)
    flags = {"fed.fleet": str(tmp_path / "board.yaml"), "fed.method": "auto"}
    # Execute: plan the same fleet with LoRA on every block, then on the top one only
    plans = {}
    for layers_flag in ("all", "top:1"):
        fed = setup(config(**flags, **{"peft.layers": layers_flag}))
        algo = build_algorithm(fed)
        plans[layers_flag] = algo.planner(fed).plan(0, [0, 1], fed.fleet, [])
    # Assert: P-RGE with every block trained; first-order when only the top block is
    assert {p.method for p in plans["all"].values()} == {"prge"}
    assert {p.method for p in plans["top:1"].values()} == {"fo"}
    assert fed.backprop_share == 1 / layers
