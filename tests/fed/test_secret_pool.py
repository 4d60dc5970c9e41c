"""FedKSeed's secret seed pool (fed.secret_pool): with the round keys a client replays the
server's model bit for bit; without them the same scalars replay into another model; the
keys travel on the wire and the secret survives a resume."""

from __future__ import annotations

import pytest
import torch

from edgetune.config import resolve_config
from edgetune.errors import ConfigError, EdgetuneError
from edgetune.fed.algorithms.base import load_trainable, trainable_state
from edgetune.fed.algorithms.fedkseed import FedKSeed, HeldModel, replay, seed_pool
from edgetune.fed.config import FedConfig, FederateConfig
from edgetune.fed.fleet import BUILTIN_PROFILES
from edgetune.fed.payloads import PayloadError, ZOTrace, decode, encode
from edgetune.fed.plan import ClientPlan
from edgetune.models import tiny_llama
from edgetune.peft import PeftConfig, attach

POOL = 32


def _adapter():
    return attach(tiny_llama(seed=3), PeftConfig(rank=2), seed=0)


def _server(secret_pool=True, seed=5):
    cfg = FedConfig(algorithm="fedkseed", pool_size=POOL, secret_pool=secret_pool)
    return FedKSeed(cfg, _adapter(), seed=seed, lr=0.01)


def _plan(client):
    return ClientPlan(client, BUILTIN_PROFILES["rpi5"], "zo", None)


def _two_rounds(server):
    """Rounds 0 and 1 aggregated from fixed traces (client 9 never takes part)."""
    for rnd in range(2):
        traces = [
            (0, ZOTrace([3, 7, 3], [0.5, -1.0, 2.0], [0.01] * 3, 10)),
            (1, ZOTrace([7, 30], [1.5, -0.25], [0.01] * 2, 30)),
        ]
        server.aggregate(rnd, traces)


def test_a_client_with_the_round_keys_replays_the_servers_model_and_one_without_cannot():
    # Prepare: two rounds on a server with a secret pool; a device that missed both
    server = _server()
    start = {k: v.clone() for k, v in server.state.items()}
    _two_rounds(server)
    broadcast = decode(encode(server.configure(2, _plan(9))))  # what travels to the device
    # Execute: the device (its own FedKSeed from the same config, another secret) catches up
    device = _server()
    assert device.secret != server.secret
    adapter = _adapter()
    held = device.catch_up(adapter, broadcast, HeldModel.from_state(None, start, POOL))
    # Assert: bit for bit the server's model, from the keys alone
    assert len(broadcast.keys) == 3  # rounds 0 and 1, and round 2 to train in
    assert all(torch.equal(held.tensors[k], server.state[k]) for k in start)
    # ... while an eavesdropper with the config (the public pool) and the scalars is not
    eavesdropper = _adapter()
    load_trainable(eavesdropper, start)
    for scalars in broadcast.rounds:
        replay(eavesdropper.trainable(), seed_pool(5, POOL), scalars)
    seen = trainable_state(eavesdropper)
    moved = sum(float((server.state[k] - start[k]).norm()) for k in start)
    off = sum(float((seen[k] - server.state[k]).norm()) for k in start)
    assert moved > 0 and off > 0.5 * moved
    # The keys rotate: every round has its own pool
    pools = device.client_pools(broadcast)
    assert pools[0] != pools[1] != pools[2] and pools[0] != seed_pool(5, POOL)


def test_without_the_secret_pool_the_public_pool_and_no_keys_travel():
    server = _server(secret_pool=False)
    _two_rounds(server)
    broadcast = decode(encode(server.configure(2, _plan(9))))
    assert broadcast.keys == [] and server.secret is None
    assert server.client_pools(broadcast) == [seed_pool(5, POOL)] * 3


def test_a_device_whose_config_disagrees_with_the_broadcast_is_told_so():
    server = _server()
    _two_rounds(server)
    broadcast = server.configure(2, _plan(9))
    with pytest.raises(EdgetuneError, match="fed.secret_pool=False"):
        _server(secret_pool=False).client_pools(broadcast)


def test_a_resumed_server_keeps_its_secret_and_so_its_round_keys():
    first = _server()
    _two_rounds(first)
    resumed = _server()
    resumed.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
    assert resumed.secret == first.secret
    assert resumed.configure(2, _plan(9)).keys == first.configure(2, _plan(9)).keys


@pytest.mark.parametrize(
    "keys, message",
    [([1, 2], "one round key per round sent"), (["x", 1, 2], "key must be an integer")],
)
def test_a_broadcast_with_bad_keys_is_refused(keys, message):
    server = _server()
    _two_rounds(server)
    broadcast = server.configure(2, _plan(9))
    broadcast.keys = keys
    with pytest.raises(PayloadError, match=message):
        decode(encode(broadcast))


@pytest.mark.parametrize(
    "algorithm, message",
    [
        ("fedkseed-pro", r"fed.secret_pool draws new seeds every round.*fedkseed-pro"),
        ("fedit", r"fed.secret_pool.*fedkseed"),
    ],
)
def test_the_secret_pool_is_refused_where_it_would_not_act(algorithm, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(
            FederateConfig,
            overrides=[f"fed.algorithm={algorithm}", "fed.method=zo", "fed.secret_pool=true"],
        )
