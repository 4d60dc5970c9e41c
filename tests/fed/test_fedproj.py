"""FedProj: the block projection's math, the server's rebuild against the clients'
replay, catch-up and resync, bad uploads, and real stories260K federations (bytes,
kill and resume)."""

from __future__ import annotations

import json

import pytest
import torch

from edgetune.cli import main
from edgetune.config import resolve_config
from edgetune.errors import ConfigError
from edgetune.fed.algorithms.base import trainable_state
from edgetune.fed.algorithms.fedproj import BlockLayout, FedProj, HeldAdapter, flatten
from edgetune.fed.attacks import Attack, corrupt
from edgetune.fed.config import FedConfig, FederateConfig
from edgetune.fed.fleet import BUILTIN_PROFILES
from edgetune.fed.payloads import ProjectedRounds, Projection, decode, encode
from edgetune.fed.plan import ClientPlan
from edgetune.models import tiny_llama
from edgetune.peft import PeftConfig, attach
from edgetune.runs import RunDir


def _adapter():
    return attach(tiny_llama(seed=3), PeftConfig(rank=2), seed=0)  # 2048 trainable values


def _server(k=64, **kw):
    return FedProj(FedConfig(algorithm="fedproj", proj_k=k, **kw), _adapter(), seed=5)


def _plan(client):
    return ClientPlan(client, BUILTIN_PROFILES["jetson-agx-orin"], "fo", None)


def _upload(server, rnd, client, scale=1e-3, n=10):
    """A client's honest-looking projection for round `rnd`."""
    gen = torch.Generator().manual_seed(100 * rnd + client)
    coefs = (torch.randn(server.layout.k, generator=gen) * scale).to(torch.float32)
    return Projection(server.round_seed(rnd), coefs, server.layout.numel, n, {"loss": 1.0})


def _play(server, rnd, clients):
    """Round `rnd`: configure every client (through the wire), aggregate their uploads."""
    sent = {c: decode(encode(server.configure(rnd, _plan(c)))) for c in clients}
    result = server.aggregate(rnd, [(c, _upload(server, rnd, c)) for c in clients])
    assert result.accepted == list(clients)
    return sent


def _caught_up(server, payload, held):
    adapter = _adapter()
    now = server.catch_up(adapter, payload, held)
    return now, trainable_state(adapter)


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_blocks_cover_the_vector_and_projection_is_exact_inside_the_span():
    # Prepare: 1000 values on 64 blocks (40 of 16 values, 24 of 15), an update in the span
    layout = BlockLayout(1000, 64)
    alpha = torch.randn(64, generator=torch.Generator().manual_seed(0))
    inside = layout.rebuild(alpha, seed=11)
    # Execute
    coefs = layout.project(inside, seed=11)
    other = layout.project(inside, seed=12)
    # Assert: the sizes, the signs, the coefficients recovered exactly (another round's
    # directions do not recover them)
    assert layout.sizes().tolist() == [16.0] * 40 + [15.0] * 24
    assert set(layout.signs(11).unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(coefs, alpha)
    assert not torch.allclose(other, alpha, atol=0.1)


def test_the_projection_never_opposes_the_update_and_its_scaled_mean_converges_to_it():
    # Prepare: a fixed update of 600 values on 30 blocks of 20
    layout = BlockLayout(600, 30)
    delta = torch.randn(600, generator=torch.Generator().manual_seed(1))
    sizes = layout.sizes().repeat_interleave(20).double()

    def scaled_mean(draws):
        total = torch.zeros(600, dtype=torch.float64)
        for seed in range(draws):
            rebuilt = layout.rebuild(layout.project(delta, seed), seed).double()
            assert float(rebuilt @ delta.double()) >= 0.0  # a projection: never against it
            total += sizes * rebuilt  # n_b c_b r_b, the unbiased estimate
        return total / draws

    # Execute
    errors = [float((scaled_mean(m) - delta).norm() / delta.norm()) for m in (100, 1600)]
    # Assert: the mean of n_b c_b r_b converges to the update like 1 / sqrt(draws)
    # (expected relative error sqrt((n_b - 1) / draws): 0.44, then 0.11)
    assert errors[1] < 0.15 and errors[1] < errors[0] / 3


def test_the_servers_rebuilt_adapter_equals_every_clients_replay_bit_for_bit():
    # Prepare: two rounds of two clients
    server = _server()
    start = {k: v.clone() for k, v in server.state.items()}
    _play(server, 0, [0, 1])
    _play(server, 1, [0, 1])
    broadcast = decode(encode(server.configure(2, _plan(0))))
    # Execute: two clients that hold the adapter of round 1 replay round 2's broadcast
    held = HeldAdapter({k: v.clone() for k, v in start.items()}, 0)
    _, round_one = _caught_up(server, decode(encode(_configure_at(server, 1, 0))), held)
    clients = [_caught_up(server, broadcast, HeldAdapter(dict(round_one), 1)) for _ in range(2)]
    # Assert: both hold exactly the server's adapter, which moved by the rebuilt steps
    assert broadcast.first_round == 1 and len(broadcast.seeds) == 1
    for now, tensors in clients:
        assert now.round == 2 and _equal(tensors, server.state)
    moved = flatten(list(server.state.values())) - flatten(list(start.values()))
    steps = sum(
        server.layout.rebuild(a, s).double()
        for s, a in zip(server.seeds, server.history, strict=True)
    )
    assert torch.allclose(moved.double(), steps, atol=1e-7) and moved.abs().sum() > 0


def _configure_at(server, rounds, client):
    """The catch-up a client that holds nothing gets for the first `rounds` rounds."""
    return ProjectedRounds(
        server.round_seed(rounds),
        0,
        server.layout.numel,
        server.layout.k,
        server.seeds[:rounds],
        server.history[:rounds],
    )


def test_a_client_that_missed_rounds_catches_up_and_a_restarted_one_too():
    # Prepare: client 2 takes part in round 0 only; then rounds 1..3 run without it
    server = _server()
    _play(server, 0, [0, 1, 2])
    first = HeldAdapter({k: v.clone() for k, v in server.initial.items()}, 0)
    _, held = _caught_up(server, _configure_at(server, 0, 2), first)
    for rnd in (1, 2, 3):
        _play(server, rnd, [0, 1])
    # Execute: client 2 comes back at round 4; client 1 restarts and holds nothing
    back = decode(encode(server.configure(4, _plan(2))))
    now, tensors = _caught_up(server, back, HeldAdapter(held, 0))
    server.forget(1)
    fresh = decode(encode(server.configure(4, _plan(1))))
    _, restarted = _caught_up(server, fresh, HeldAdapter.from_state(None, server.initial))
    # Assert: the broadcasts carry exactly the missed rounds; both hold the global adapter
    assert (back.first_round, len(back.seeds), back.tensors) == (0, 4, {})
    assert (fresh.first_round, len(fresh.seeds)) == (0, 4)
    assert now.round == 4 and _equal(tensors, server.state) and _equal(restarted, server.state)


def test_catching_up_longer_than_the_adapter_costs_is_a_resync():
    # Prepare: K = 640 coefficients on a 2048-value adapter: a round costs 2,568 bytes
    # of catch-up, the adapter 8,192 and its 2.6 KB tensor list, so a client 5 rounds
    # behind is resynced
    server = _server(k=640)
    for rnd in range(5):
        _play(server, rnd, [0])
    # Execute: client 1 holds round 2's adapter; client 2 nothing
    server.synced[1] = 2
    behind_three = server.configure(5, _plan(1))
    behind_five = decode(encode(server.configure(5, _plan(2))))
    now, tensors = _caught_up(server, behind_five, HeldAdapter.from_state(None, server.initial))
    # Assert: three rounds travel as coefficients; five as the adapter, which the client
    # then holds exactly, and which is smaller on the wire than the rounds would be
    assert len(behind_three.seeds) == 3 and not behind_three.tensors
    assert behind_five.seeds == [] and behind_five.first_round == 5
    assert now.round == 5 and _equal(tensors, server.state)
    assert len(encode(behind_five)) < len(encode(_configure_at(server, 5, 2)))


def test_bad_uploads_are_rejected_with_the_reason_and_the_adapter_stays():
    # Prepare: an honest upload and one of each fault
    server = _server(max_update_norm=1.0)
    good = _upload(server, 0, 0)
    wrong_k = _upload(server, 0, 1)
    wrong_k.coefs = wrong_k.coefs[:-1]
    stale = _upload(server, 0, 2)
    stale.seed = server.round_seed(1)
    nan = _upload(server, 0, 3)
    nan.coefs[7] = float("nan")
    big = _upload(server, 0, 4, scale=10.0)
    layout = _upload(server, 0, 5)
    layout.numel += 1
    uploads = [good, wrong_k, stale, nan, big, layout]
    reference = _server(max_update_norm=1.0)
    # Execute: through the wire, as a transport delivers them
    result = server.aggregate(0, [(c, decode(encode(u))) for c, u in enumerate(uploads)])
    reference.aggregate(0, [(0, decode(encode(good)))])
    # Assert
    assert result.accepted == [0]
    assert "63 coefficients, expected fed.proj_k=64" in result.rejected[1]
    assert "not this round's" in result.rejected[2]
    assert "non-finite coefficient" in result.rejected[3]
    assert "exceeds the bound 1" in result.rejected[4]
    assert "layout over 2049 values, the adapter has 2048" in result.rejected[5]
    assert _equal(server.state, reference.state)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "clip-mean"])
def test_robust_rules_on_coefficient_vectors_neutralise_a_scaled_client(rule):
    # Prepare: four honest clients and one sending 100x its update (under the hard bound)
    tuning = {"trimmed-mean": {"trim": 0.25}, "clip-mean": {"clip": 0.05}}.get(rule, {})
    robust, plain = _server(aggregator=rule, **tuning), _server()
    honest = [(c, _upload(robust, 0, c)) for c in range(4)]
    attack = corrupt(_upload(robust, 0, 4), Attack("scale", 0.2), 0, 0, 4, 1e4)
    # Execute
    robust.aggregate(0, [*honest, (4, attack)])
    plain.aggregate(0, [*honest, (4, attack)])
    # Assert: the robust step is a fraction of the plain mean's
    assert robust.history[0].norm() < 0.3 * plain.history[0].norm()


def test_the_step_is_the_unbiased_rebuild_scaled_by_the_server_lr():
    # Prepare: 64 blocks of 32 values
    one, two = _server(), _server(server_lr=2.0)
    update = _upload(one, 0, 0)
    # Execute
    one.aggregate(0, [(0, update)])
    two.aggregate(0, [(0, update)])
    # Assert: a_b = server_lr x n_b x c_b
    assert torch.equal(one.history[0], update.coefs * 32.0)
    assert torch.equal(two.history[0], 2.0 * one.history[0])


def test_a_checkpoint_restores_the_server_exactly():
    server = _server()
    for rnd in range(2):
        _play(server, rnd, [0, 1])
    state = {k: v.clone() for k, v in server.state_dict().items()}
    copy = _server()
    copy.load_state_dict(state)
    assert copy.seeds == server.seeds and copy.synced == server.synced
    assert all(torch.equal(a, b) for a, b in zip(copy.history, server.history, strict=True))
    assert _equal(copy.state, server.state) and _equal(copy.initial, server.initial)
    assert encode(copy.configure(2, _plan(3))) == encode(server.configure(2, _plan(3)))


def test_the_default_k_uploads_under_16_kb_for_smollm2s_adapter():
    k = FedConfig(algorithm="fedproj").proj_k
    upload = Projection(2**63 - 1, torch.ones(k), 2_442_240, 10**6, {"loss": 1 / 3})
    assert len(encode(upload)) <= 16_000


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"fed.proj_k": 0}, r"fed\.proj_k"),
        ({"fed.algorithm": "fedit", "fed.proj_k": 16}, r"fed\.proj_k=16 is not read by .*fedit"),
    ],
)
def test_bad_settings_are_refused(setting, message):
    flags = {"fed.algorithm": "fedproj", "fed.method": "fo", **setting}
    with pytest.raises(ConfigError, match=message):
        resolve_config(FederateConfig, None, [], flags)


def test_more_coefficients_than_adapter_values_is_refused_with_the_limit():
    with pytest.raises(ConfigError, match=r"fed\.proj_k=4096: the adapter has 2048 .*<= 2048"):
        _server(k=4096)


def test_fedproj_federates_from_the_cli_at_k_x_4_bytes_up(tmp_path, federate_args):
    # Execute: 3 rounds of 3 of 5 stories260K clients at K = 512
    out = tmp_path / "run"
    argv = federate_args(out, "--method", "fo", "fed.proj_k=512", algorithm="fedproj", rounds=3)
    assert main(argv) == 0
    # Assert: every upload is 512 float32 and a short header; the adapter moved
    clients = RunDir(out, resume=True).read_metrics("clients.jsonl")
    ups = [c["bytes_up"] for c in clients if c["status"] == "ok"]
    assert ups and all(2048 < up < 2048 + 200 for up in ups)
    rows = RunDir(out, resume=True).read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and all(r["rejected"] == 0 for r in rows[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "fedproj" and summary["status"] == "done"
    bad = main(federate_args(tmp_path / "bad", "fed.proj_k=50000", algorithm="fedproj"))
    assert bad == 2 and not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_a_killed_fedproj_federation_resumes_to_the_uninterrupted_one(
    tmp_path, federate_args, run_torn, capsys
):
    # Prepare: K = 40000 on stories260K's 46,240 values, so a client 2 rounds behind is
    # resynced; a 4-round reference, and the same run killed while logging round 3
    extra = ("--method", "fo", "fed.proj_k=40000", "--threads", "1")
    straight = tmp_path / "straight"
    assert main(federate_args(straight, *extra, algorithm="fedproj", rounds=4)) == 0
    run = tmp_path / "torn"
    run_torn(federate_args(run, *extra, algorithm="fedproj", rounds=4), "metrics.jsonl", "round", 3)
    capsys.readouterr()
    # Execute
    assert main(["federate", "--resume", str(run), "--threads", "1"]) == 0
    # Assert: the same adapter and metrics; the run did catch up and resync
    adapter = "adapter/adapter_model.safetensors"
    assert (run / adapter).read_bytes() == (straight / adapter).read_bytes()
    assert (run / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()
    downs = [c["bytes_down"] for c in RunDir(straight, resume=True).read_metrics("clients.jsonl")]
    assert any(d > 4 * 46_240 for d in downs), "no client was resynced"
    assert any(4 * 40_000 < d < 4 * 46_240 for d in downs), "no client caught up"


def test_attacks_corrupt_a_projections_coefficients():
    # Prepare: two honest projections of one round
    server = _server(k=4)
    honest = [_upload(server, 0, c) for c in range(2)]

    def hit(kind):
        return corrupt(honest[0], Attack(kind, 0.2), 0, 1, 2, 1e4, honest)

    # Assert: each kind acts on the coefficients and keeps the seed and layout
    assert torch.equal(hit("signflip").coefs, -honest[0].coefs)
    assert torch.equal(hit("scale").coefs, honest[0].coefs * 100.0)
    assert torch.isnan(hit("nan").coefs[0]) and hit("nan").seed == honest[0].seed
    stacked = torch.stack([h.coefs.double() for h in honest])
    alie = (stacked.mean(0) - stacked.std(0, correction=0)).float()
    assert torch.equal(hit("alie").coefs, alie) and hit("ipm").numel == honest[0].numel


def test_a_device_that_cannot_backprop_projects_its_zo_update_too(tmp_path, federate_args):
    # Prepare: a board too small to backprop (P-RGE) beside one that can
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "fleet:\n  - {name: tiny-board, memory_mb: 5, gflops: 5, up_mbps: 1, down_mbps: 5}\n"
        "  - {name: board, memory_mb: 48000, gflops: 100, up_mbps: 10, down_mbps: 10}\n"
    )
    out = tmp_path / "run"
    argv = federate_args(out, "fed.proj_k=512", algorithm="fedproj", fleet=str(fleet))
    # Execute
    assert main([*argv, "--clients", "2", "--participation", "1.0"]) == 0
    # Assert: both methods ran, every upload is 512 coefficients, none was rejected
    clients = RunDir(out, resume=True).read_metrics("clients.jsonl")
    assert {c["method"] for c in clients} == {"prge", "fo"}
    assert all(c["status"] == "ok" and 2048 < c["bytes_up"] < 2048 + 200 for c in clients)
