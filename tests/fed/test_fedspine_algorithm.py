"""FedSpine's algorithm object on a real stories260K federation: a zeroth-order device's
seed trace replays on the server into exactly the delta the device computed on its pruned
sub-model, unit statistics re-order the units, and hostile statistics are rejected."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from edgetune.config import resolve_config
from edgetune.fed.algorithms import build_algorithm
from edgetune.fed.algorithms.fedspine import STATS
from edgetune.fed.config import FederateConfig
from edgetune.fed.payloads import LoraDelta, SeedTrace, decode, encode
from edgetune.fed.session import setup

FLEET = "fleet:\n  - {name: board, memory_mb: 48000, gflops: 100, up_mbps: 10, down_mbps: 10}\n"


@pytest.fixture
def spine(stories260k_path, shared_data, tmp_path):
    """(federation, FedSpine) of 2 boards, planned for round 2 at sparsity 0.5."""
    del shared_data
    (tmp_path / "fleet.yaml").write_text(FLEET)
    flags = {
        "model": str(stories260k_path),
        "out": str(tmp_path / "run"),
        "data.dataset": "sst2",
        "fed.algorithm": "fedspine",
        "fed.method": "zo",
        "fed.clients": 2,
        "fed.participation": 1.0,
        "fed.rounds": 2,
        "fed.local_steps": 2,
        "fed.fleet": str(tmp_path / "fleet.yaml"),
        "train.batch_size": 4,
        "train.progress": False,
        "spine.target_sparsity": 0.5,
        "spine.reorder_every": 2,
    }
    overrides = ["data.train_size=40", "data.eval_size=8", "data.max_length=32"]
    fed = setup(resolve_config(FederateConfig, None, overrides, flags))
    algo = build_algorithm(fed)
    torch.manual_seed(0)  # a non-zero global adapter, so a slice differs from zeros
    algo.server.state = {k: v + 0.01 * torch.randn_like(v) for k, v in algo.state.items()}
    return fed, algo


def _plan(fed, algo, rnd):
    plans = algo.planner(fed).plan(rnd, [0, 1], fed.fleet, [])
    return {c: dataclasses.replace(p, method="zo") for c, p in plans.items()}


def test_a_zo_trace_replays_into_the_delta_the_device_computed(spine):
    # Prepare: round 1 (no statistics: zo devices send seed traces) at a pruned arm
    fed, algo = spine
    plan = _plan(fed, algo, 1)[0]
    assert plan.ratio and plan.ratio > 0 and plan.rank
    job = fed.job(0, 1, "zo")
    payload = decode(encode(algo.configure(1, plan)))  # round 1 asks for no statistics
    # Execute: the same local round as a trace and, asked for statistics, as a delta
    trace, _ = algo.client_update(fed.adapter, payload, job, None)
    payload.meta["stats"] = 1.0
    delta, _ = algo.client_update(fed.adapter, payload, job, None)
    # Assert: the server's replay in the plan's shapes is the device's own delta
    assert isinstance(trace, SeedTrace) and isinstance(delta, LoraDelta)
    replayed = algo.server.as_delta(trace, algo.shapes(plan))
    names = [n for n in delta.tensors if n not in STATS]
    assert set(replayed.tensors) == set(names)
    assert all(torch.equal(replayed.tensors[n], delta.tensors[n]) for n in names)
    assert any(replayed.tensors[n].abs().max() > 0 for n in names)
    held = sum(len(k) for k in algo.kept(plan.ratio).mlp)
    assert delta.tensors[STATS[0]].numel() == held < sum(len(k) for k in algo.kept(0).mlp)


def test_statistics_reorder_the_units_and_hostile_ones_are_rejected(spine):
    # Prepare: round 3 (0-based 2) asks both devices for unit statistics; device 1's are
    # negative
    fed, algo = spine
    plans = _plan(fed, algo, 1)
    updates = []
    for client, plan in plans.items():
        payload = decode(encode(algo.configure(2, plan)))
        update, _ = algo.client_update(fed.adapter, payload, fed.job(client, 2, "zo"), None)
        updates.append((client, decode(encode(update))))
    updates[1][1].tensors[STATS[1]] = -updates[1][1].tensors[STATS[1]] - 1.0
    before = algo.order.state_dict()
    untouched = algo.state_dict()
    # Execute
    result = algo.aggregate(2, updates, plans)
    # Assert: device 0 aggregated and re-ordered the units; device 1 rejected, by reason
    assert result.accepted == [0] and "finite and >= 0" in result.rejected[1]
    assert result.stats["reordered"] > 0
    assert not torch.equal(before["mlp"], algo.order.state_dict()["mlp"])
    moved = [k for k, v in algo.state.items() if not torch.equal(v, untouched[f"state.{k}"])]
    assert moved, "the accepted delta moved the global adapter"
