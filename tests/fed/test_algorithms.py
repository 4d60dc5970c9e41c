"""Federated math without a transport: FedAvg, FedKSeed replay, validation, robustness,
payload bytes."""

from __future__ import annotations

import pytest
import torch

from edgetune.fed import algorithms
from edgetune.fed.algorithms.base import load_trainable, trainable_state
from edgetune.fed.algorithms.fedit import FedIT
from edgetune.fed.algorithms.fedkseed import FedKSeed, replay
from edgetune.fed.config import FedConfig
from edgetune.fed.fleet import BUILTIN_PROFILES
from edgetune.fed.payloads import LoraDelta, SeedScalars, ZOTrace, decode, encode
from edgetune.fed.plan import ClientPlan
from edgetune.models import tiny_llama
from edgetune.peft import PeftConfig, attach


def _plan(client, method="zo", rank=None):
    return ClientPlan(client, BUILTIN_PROFILES["rpi5"], method, rank)


def _adapter():
    return attach(tiny_llama(seed=3), PeftConfig(rank=2), seed=0)


def _delta(state, scale, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return LoraDelta({k: torch.randn(v.shape, generator=gen) * scale for k, v in state.items()}, n)


def test_fedavg_equals_a_hand_computed_weighted_average():
    # Prepare: three clients with 1, 2 and 5 examples
    adapter = _adapter()
    algo = FedIT(FedConfig(), adapter)
    before = {k: v.clone() for k, v in algo.state.items()}
    updates = [(c, _delta(before, 0.01, n, c)) for c, n in enumerate([1, 2, 5])]
    # Execute
    result = algo.aggregate(0, updates)
    # Assert: theta + (1 d0 + 2 d1 + 5 d2) / 8 for every tensor
    assert result.accepted == [0, 1, 2] and not result.rejected
    for name in before:
        d = [u.tensors[name] for _, u in updates]
        expected = before[name] + (1 * d[0] + 2 * d[1] + 5 * d[2]) / 8
        assert torch.allclose(algo.state[name], expected, atol=1e-7)


@pytest.mark.parametrize("opt", ["fedavgm", "fedadam", "fedyogi"])
def test_server_optimizers_move_along_the_mean_delta(opt):
    adapter = _adapter()
    algo = FedIT(FedConfig(server_optimizer=opt, server_lr=0.01), adapter)
    before = {k: v.clone() for k, v in algo.state.items()}
    update = _delta(before, 0.01, 4, 1)
    algo.aggregate(0, [(0, update)])
    step = torch.cat([(algo.state[k] - before[k]).flatten() for k in before])
    mean = torch.cat([update.tensors[k].flatten() for k in before])
    assert torch.nn.functional.cosine_similarity(step, mean, dim=0) > 0.5


def test_fedkseed_replay_on_two_clients_gives_identical_models():
    # Prepare: a server round with two traces
    server = FedKSeed(FedConfig(algorithm="fedkseed", pool_size=64), _adapter(), seed=5, lr=0.01)
    traces = [
        (0, ZOTrace([3, 7, 3], [0.5, -1.0, 2.0], [0.01] * 3, 10)),
        (1, ZOTrace([7, 60], [1.5, -0.25], [0.01] * 2, 30)),
    ]
    start = {k: v.clone() for k, v in server.state.items()}
    result = server.aggregate(0, traces)
    broadcast = decode(encode(server.configure(1, _plan(0))))
    # Execute: two clients holding the old model replay the broadcast
    clients = [_adapter(), _adapter()]
    for client in clients:
        load_trainable(client, start)
        replay(client.trainable(), server.pool, broadcast.rounds[-1])
    # Assert: identical to each other and to the server, and moved
    a, b = (trainable_state(c) for c in clients)
    assert result.accepted == [0, 1] and result.stats["seeds_used"] == 3
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], server.state[k]) for k in a)
    assert any(not torch.equal(a[k], start[k]) for k in a)
    # the accumulated scalar of seed 7: (10 * -1.0 + 30 * 1.5) / 40 * lr
    assert broadcast.rounds[-1][7] == pytest.approx(0.01 * (10 * -1.0 + 30 * 1.5) / 40)


def test_malicious_fedit_updates_are_rejected_and_the_model_stays_close():
    adapter = _adapter()
    algo = FedIT(FedConfig(max_update_norm=1.0), adapter)
    state = {k: v.clone() for k, v in algo.state.items()}
    honest = [(c, _delta(state, 0.001, 10, c)) for c in range(3)]
    nan = _delta(state, 0.001, 10, 9)
    next(iter(nan.tensors.values()))[0] = float("nan")
    shape = _delta(state, 0.001, 10, 8)
    key = next(iter(shape.tensors))
    shape.tensors[key] = torch.zeros(3, 3)
    scaled = _delta(state, 1000.0, 10, 7)
    result = algo.aggregate(0, [*honest, (3, nan), (4, shape), (5, scaled)])
    assert result.accepted == [0, 1, 2]
    assert "non-finite" in result.rejected[3]
    assert "got (3, 3) torch.float32, expected (2, 32)" in result.rejected[4]
    assert "exceeds the bound" in result.rejected[5]
    reference = FedIT(FedConfig(), _adapter())
    reference.aggregate(0, honest)
    assert all(torch.equal(algo.state[k], reference.state[k]) for k in state)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "clip-mean"])
def test_robust_rules_neutralise_a_scaled_update_within_the_norm_bound(rule):
    adapter = _adapter()
    tuning = {"trimmed-mean": {"trim": 0.25}, "clip-mean": {"clip": 0.05}}.get(rule, {})
    cfg = FedConfig(aggregator=rule, max_update_norm=50.0, **tuning)
    algo = FedIT(cfg, adapter)
    state = {k: v.clone() for k, v in algo.state.items()}
    honest = [(c, _delta(state, 0.001, 10, c)) for c in range(4)]
    attack = _delta(state, 0.1, 10, 99)  # 100x larger, still under the hard bound
    algo.aggregate(0, [*honest, (4, attack)])
    plain = FedIT(FedConfig(max_update_norm=50.0), _adapter())
    plain.aggregate(0, [*honest, (4, attack)])
    moved = sum(float((algo.state[k] - state[k]).norm()) for k in state)
    moved_plain = sum(float((plain.state[k] - state[k]).norm()) for k in state)
    assert all(torch.isfinite(v).all() for v in algo.state.values())
    assert moved < 0.3 * moved_plain


def test_bad_traces_are_rejected():
    server = FedKSeed(
        FedConfig(algorithm="fedkseed", pool_size=8, max_abs_scalar=100.0),
        _adapter(),
        seed=0,
        lr=0.01,
    )
    result = server.aggregate(
        0,
        [
            (0, ZOTrace([9], [1.0], [0.01], 5)),  # out of the pool
            (1, ZOTrace([1], [float("nan")], [0.01], 5)),
            (2, ZOTrace([1], [1e6], [0.01], 5)),
            (3, ZOTrace([1, 2], [1.0], [0.01], 5)),
            (4, LoraDelta({}, 5)),
        ],
    )
    assert result.accepted == [] and set(result.rejected) == {0, 1, 2, 3, 4}
    assert "outside the pool" in result.rejected[0]


def test_payload_round_trips_and_sizes():
    state = trainable_state(_adapter())
    delta = LoraDelta(state, 3, {"loss": 1.5})
    back = decode(encode(delta))
    assert back.num_examples == 3 and all(torch.equal(back.tensors[k], state[k]) for k in state)
    trace = ZOTrace(list(range(100)), [0.5] * 100, [1e-3] * 100, 7)
    data = encode(trace)
    assert decode(data).indices == trace.indices
    assert len(data) < 100 * 12 + 100  # 12 bytes a step plus a small header
    sparse = SeedScalars([[0.0] * 1024, [0.0] * 1000 + [0.5] + [0.0] * 23], 3, 1024)
    assert decode(encode(sparse)) == sparse
    assert len(encode(sparse)) < 12 + 80  # only the non-zero scalar travels
    with pytest.raises(Exception, match="bad magic"):
        decode(b"pickle-me")


def test_fleet_profiles_and_method_choice(tmp_path):
    from edgetune.errors import ConfigError
    from edgetune.fed.fleet import choose_method, load_fleet, round_seconds

    fleet = load_fleet("mixed", 7)
    assert len(fleet) == 7 and fleet[0].name == fleet[5].name == "phone-midrange"
    big = 135_000_000
    phone, agx = fleet[0], fleet[4]
    assert choose_method(agx, big, "auto") == "fo"
    assert choose_method(phone, big, "auto") in ("prge", "zo")  # backprop does not fit
    assert choose_method(phone, 10 * big, "auto") is None
    t = round_seconds(phone, host_seconds=1.0, bytes_down=10**6, bytes_up=10**6, host_gflops=140)
    assert t == pytest.approx(140 / 60 + 8 / 50 + 8 / 10)
    path = tmp_path / "f.yaml"
    path.write_text(
        "fleet:\n  - {name: tiny, memory_mb: 100, gflops: 1, up_mbps: 1, down_mbps: 1}\n  - rpi5\n"
    )
    assert [p.name for p in load_fleet(str(path), 3)] == ["tiny", "rpi5", "tiny"]
    with pytest.raises(ConfigError, match="not a built-in fleet"):
        load_fleet("nonsense", 2)


def test_seed_trace_replay_rebuilds_the_zo_client_exactly(stories260k_path, shared_data):
    """Hybrid fleets: the server turns a ZO client's seeds into its exact local adapter."""
    del shared_data
    from edgetune import models
    from edgetune.data import DataConfig, build_task, load_splits
    from edgetune.fed.local import ClientJob
    from edgetune.train import OptimConfig
    from edgetune.zo import ZOConfig
    from edgetune.zo.directions import add_direction

    model, tokenizer = models.load(str(stories260k_path))
    adapter = attach(model, PeftConfig(), seed=0)
    cfg = DataConfig(dataset="sst2", train_size=32, eval_size=8, max_length=32)
    splits = load_splits(cfg, 0)
    task = build_task(splits, cfg, tokenizer)
    algo = FedIT(FedConfig(), adapter)
    for method in ("zo", "prge"):
        job = ClientJob(
            0,
            0,
            method,
            task,
            task.prepare_rows(splits.train),
            3,
            4,
            1e-2,
            11,
            OptimConfig(lr=1e-2),
            ZOConfig(queries=2),
        )
        update, state = algo.client_update(adapter, algo.configure(0, _plan(0, method)), job, None)
        assert state is None  # FedIT clients keep nothing between rounds
        trace = decode(encode(update))
        local = trainable_state(adapter)
        names = list(algo.state)
        params = [algo.state[n].clone() for n in names]
        for seed, coef in zip(trace.seeds, trace.coefs, strict=True):
            add_direction(params, seed, -coef)
        assert len(trace.seeds) == 6
        assert all(torch.equal(p, local[n]) for n, p in zip(names, params, strict=True))
        delta = algo.server.as_delta(trace, algo.server.shapes(_plan(0, method)))
        assert delta.meta["replayed"] == 1.0
        assert all(
            torch.allclose(algo.state[n] + delta.tensors[n], local[n], atol=1e-7) for n in names
        )


def test_every_name_in_all_exists_so_a_star_import_works():
    assert [name for name in algorithms.__all__ if not hasattr(algorithms, name)] == []
