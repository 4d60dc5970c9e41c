"""Heterogeneous LoRA ranks: the aggregation rules, the rank view clients train in, and
FedIT with clients of mixed ranks."""

from __future__ import annotations

import pytest
import torch

from edgetune.errors import ConfigError
from edgetune.fed.aggregate import weighted_mean
from edgetune.fed.algorithms.base import load_trainable
from edgetune.fed.algorithms.fedit import FedIT
from edgetune.fed.config import FedConfig
from edgetune.fed.fleet import BUILTIN_PROFILES
from edgetune.fed.hetlora import (
    aggregate_padded,
    aggregate_svd,
    at_rank,
    rank_dim,
    tensors_rank,
    truncate,
    truncate_state,
)
from edgetune.fed.payloads import LoraDelta
from edgetune.fed.plan import ClientPlan


def _plan(client: int, rank: int | None) -> ClientPlan:
    return ClientPlan(client, BUILTIN_PROFILES["rpi5"], "fo", rank)


def _pair(rank: int, seed: int, out: int = 6, inp: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen)


def test_equal_ranks_zero_padding_equals_plain_fedavg():
    pairs = [_pair(4, s) for s in range(3)]
    weights = [1.0, 2.0, 5.0]
    a, b = aggregate_padded([p[0] for p in pairs], [p[1] for p in pairs], weights, 4)
    assert torch.allclose(a, weighted_mean([p[0] for p in pairs], weights), atol=1e-6)
    assert torch.allclose(b, weighted_mean([p[1] for p in pairs], weights), atol=1e-6)


def test_padding_averages_each_component_over_the_clients_that_have_it():
    low, high = _pair(2, 0), _pair(4, 1)
    a, b = aggregate_padded([low[0], high[0]], [low[1], high[1]], [1.0, 3.0], 4)
    assert torch.allclose(a[:2], (low[0] + 3 * high[0][:2]) / 4, atol=1e-6)
    assert torch.allclose(a[2:], high[0][2:], atol=1e-6)  # not diluted by the rank-2 zeros
    assert torch.allclose(b[:, 2:], high[1][:, 2:], atol=1e-6)


def test_svd_reprojection_keeps_the_mean_weight_update_exactly():
    pairs = [_pair(2, 0), _pair(1, 1), _pair(2, 2)]
    weights = [1.0, 1.0, 2.0]
    a, b = aggregate_svd([p[0] for p in pairs], [p[1] for p in pairs], weights, 5)
    mean = sum(w * (p[1] @ p[0]) for p, w in zip(pairs, weights, strict=True)) / 4
    assert a.shape == (5, 5) and b.shape == (6, 5)
    assert torch.allclose(b @ a, mean, atol=1e-5)
    # a client of rank 2 gets the best rank-2 approximation (largest singular directions)
    a2, b2 = truncate(a, b, 2)
    err2 = torch.linalg.norm(b2 @ a2 - mean)
    s = torch.linalg.svdvals(mean)
    assert torch.isclose(err2, s[2:].norm(), atol=1e-5)


def _adapter(rank=4):
    from edgetune.models import tiny_llama
    from edgetune.peft import PeftConfig, attach

    return attach(tiny_llama(seed=3), PeftConfig(rank=rank), seed=0)


def _random_delta(state, rank, seed, scale=0.01):
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(t.shape, generator=gen) * scale
        for n, t in truncate_state(state, rank).items()
    }


def test_rank_view_runs_the_first_components_and_restores_the_full_adapter():
    from edgetune.fed.algorithms.base import trainable_state

    adapter = _adapter(rank=4)
    for p in adapter.trainable():
        torch.nn.init.normal_(p.data, std=0.1)  # B starts at zero; make every component count
    full = trainable_state(adapter)
    ids = torch.tensor([[1, 5, 9, 3]])
    with at_rank(adapter, 2):
        assert tensors_rank(trainable_state(adapter)) == 2
        viewed = adapter.model(input_ids=ids).logits
    # Reference: the rank-4 adapter with components 2 and 3 zeroed
    zeroed = {n: t.clone() for n, t in full.items()}
    for n, t in zeroed.items():
        t.narrow(rank_dim(n), 2, 2).zero_()
    load_trainable(adapter, zeroed)
    assert torch.allclose(viewed, adapter.model(input_ids=ids).logits, atol=1e-6)
    load_trainable(adapter, full)
    assert all(torch.equal(trainable_state(adapter)[n], full[n]) for n in full)


def test_fedit_with_equal_ranks_is_plain_fedavg_of_the_deltas():
    adapter = _adapter()
    algo = FedIT(FedConfig(), adapter)
    start = {n: t.clone() for n, t in algo.state.items()}
    deltas = [_random_delta(start, None, s) for s in range(3)]
    counts = [1, 2, 5]
    algo.aggregate(0, [(i, LoraDelta(deltas[i], counts[i])) for i in range(3)])
    for name in start:
        expected = start[name] + weighted_mean([d[name] for d in deltas], [1.0, 2.0, 5.0])
        assert torch.allclose(algo.state[name], expected, atol=1e-7)


def test_fedit_mixed_ranks_pads_each_component_over_its_clients():
    adapter = _adapter(rank=4)
    algo = FedIT(FedConfig(), adapter)
    start = {n: t.clone() for n, t in algo.state.items()}
    # the server hands each client its own rank
    plans = {0: _plan(0, 2), 1: _plan(1, None)}
    assert tensors_rank(algo.configure(0, plans[0]).tensors) == 2
    assert tensors_rank(algo.configure(0, plans[1]).tensors) == 4
    low, high = _random_delta(start, 2, 0), _random_delta(start, None, 1)
    result = algo.aggregate(0, [(0, LoraDelta(low, 1)), (1, LoraDelta(high, 3))], plans)
    assert result.accepted == [0, 1]
    name_a = next(n for n in start if rank_dim(n) == 0)
    name_b = name_a.replace(".lora_A.", ".lora_B.")
    got_a, got_b = algo.state[name_a] - start[name_a], algo.state[name_b] - start[name_b]
    assert torch.allclose(got_a[:2], (low[name_a] + 3 * high[name_a][:2]) / 4, atol=1e-7)
    assert torch.allclose(got_a[2:], high[name_a][2:], atol=1e-7)
    assert torch.allclose(got_b[:, 2:], high[name_b][:, 2:], atol=1e-7)
    # a rank above the global one, mixed ranks in one update, or a rank other than the
    # one planned for the client, is rejected with the shape it should have had
    wide = {
        n: torch.zeros((5, t.shape[1]) if rank_dim(n) == 0 else (t.shape[0], 5))
        for n, t in start.items()
    }
    wide_reason = algo.aggregate(1, [(4, LoraDelta(wide, 1))]).rejected[4]
    assert "got (5, " in wide_reason and "expected (4, " in wide_reason
    mixed = {**_random_delta(start, 2, 3), name_a: torch.zeros(3, start[name_a].shape[1])}
    reason = algo.aggregate(2, [(5, LoraDelta(mixed, 1))], {5: _plan(5, 2)}).rejected[5]
    assert f"{name_a}: got (3, " in reason and "expected (2, " in reason
    other = algo.aggregate(3, [(6, LoraDelta(high, 1))], {6: _plan(6, 2)}).rejected[6]
    assert "expected (2, " in other or ", 2) torch.float32" in other


def test_svd_aggregation_keeps_the_mean_product_of_mixed_rank_clients():
    adapter = _adapter(rank=4)
    algo = FedIT(FedConfig(rank_aggregation="svd"), adapter)
    start = {n: t.clone() for n, t in algo.state.items()}
    deltas = [_random_delta(start, 1, 0, 0.1), _random_delta(start, 2, 1, 0.1)]
    plans = {0: _plan(0, 1), 1: _plan(1, 2)}
    result = algo.aggregate(0, [(0, LoraDelta(deltas[0], 1)), (1, LoraDelta(deltas[1], 1))], plans)
    assert result.accepted == [0, 1]
    name_a = next(n for n in start if rank_dim(n) == 0)
    name_b = name_a.replace(".lora_A.", ".lora_B.")
    products = []
    for d in deltas:
        r = d[name_a].shape[0]
        a = start[name_a][:r] + d[name_a]
        b = start[name_b][:, :r] + d[name_b]
        products.append(b @ a)
    mean = (products[0] + products[1]) / 2
    assert torch.allclose(algo.state[name_b] @ algo.state[name_a], mean, atol=1e-6)


def test_svd_needs_the_fedavg_server():
    with pytest.raises(ConfigError, match="rank_aggregation=svd"):
        FedConfig(rank_aggregation="svd", server_optimizer="fedadam")
    with pytest.raises(ConfigError, match="fed.ranks"):
        FedConfig(ranks="2,4", algorithm="fedkseed", method="zo")
