"""Differential privacy (fed.dp): the accountant, clipping, the secret noise across a
resume, the budget stop, and the settings that would void the guarantee."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from edgetune.cli import main
from edgetune.config import resolve_config
from edgetune.errors import ConfigError
from edgetune.fed.algorithms.base import AggregateResult
from edgetune.fed.algorithms.fedit import FedIT
from edgetune.fed.algorithms.fedkseed import FedKSeed
from edgetune.fed.config import FedConfig, FederateConfig
from edgetune.fed.payloads import LoraDelta, ZOTrace
from edgetune.fed.privacy import DPConfig, Privacy
from edgetune.models import tiny_llama
from edgetune.peft import PeftConfig, attach
from edgetune.runs import RunDir


def _adapter():
    return attach(tiny_llama(seed=3), PeftConfig(rank=2), seed=0)


def _delta(state, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    return LoraDelta({k: torch.randn(v.shape, generator=gen) * scale for k, v in state.items()}, 4)


def test_the_accountant_matches_the_gaussian_mechanisms_closed_form():
    # Without sampling (q = 1) T rounds of the Gaussian mechanism have RDP
    # T * alpha / (2 sigma^2) at order alpha (Mironov 2017, Prop. 7 and 3); converted to
    # (epsilon, delta) as Opacus converts (Balle et al. 2020, Thm. 21), minimised over
    # the same orders.
    from opacus.accountants import RDPAccountant

    sigma, rounds, clients = 2.0, 10, 4
    privacy = Privacy(DPConfig(noise=sigma), clients, clients, run_seed=0)
    delta = 1 / clients
    best = math.inf
    for alpha in RDPAccountant.DEFAULT_ALPHAS:
        rdp = rounds * alpha / (2 * sigma**2)
        eps = rdp - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, eps + math.log((alpha - 1) / alpha))
    assert privacy.epsilon(rounds) == pytest.approx(best, rel=1e-9)
    # Sampling m of N clients a round spends less than the full fleet every round
    sampled = Privacy(DPConfig(noise=sigma), 40, 4, run_seed=0)
    assert sampled.rate == 0.1 and sampled.epsilon(rounds) < privacy.epsilon(rounds)


def test_clipping_bounds_what_one_client_moves_the_aggregate():
    # Prepare: 4 clients selected a round, clip 0.1, noise negligible; one client huge
    adapter = _adapter()
    privacy = Privacy(DPConfig(noise=1e-9, clip=0.1), 10, 4, run_seed=0)
    algo = FedIT(FedConfig(max_update_norm=1e9), adapter, privacy)
    before = {k: v.clone() for k, v in algo.state.items()}
    # Execute: the huge update alone
    algo.aggregate(0, [(0, _delta(before, 1e4, 1))])
    # Assert: the global adapter moved by at most clip / m
    moved = math.sqrt(sum(float((algo.state[k] - before[k]).pow(2).sum()) for k in before))
    assert moved == pytest.approx(0.1 / 4, rel=1e-6)


def test_fedkseed_clips_each_clients_per_seed_scalars_and_noises_every_seed():
    privacy = Privacy(DPConfig(noise=1.0, clip=0.5), 10, 2, run_seed=0)
    algo = FedKSeed(
        FedConfig(algorithm="fedkseed", pool_size=16), _adapter(), 0, 0.01, False, privacy
    )
    huge = ZOTrace([3, 3], [500.0, 500.0], [0.01, 0.01], 4)
    acc = algo.combine([huge], AggregateResult(), rnd=0)
    assert len(acc) == 16 and all(a != 0.0 for a in acc)  # noise on every seed
    quiet = Privacy(DPConfig(noise=1e-12, clip=0.5), 10, 2, run_seed=0)
    algo.privacy = quiet
    acc = algo.combine([huge], AggregateResult(), rnd=0)
    assert acc[3] == pytest.approx(0.01 * 0.5 / 2) and abs(sum(acc) - acc[3]) < 1e-9


def test_a_resumed_server_adds_the_noise_of_its_checkpoint():
    # Prepare: a server after one round, and a fresh one (another secret) restored from it
    adapter = _adapter()
    first = FedIT(FedConfig(), adapter, Privacy(DPConfig(noise=1.0), 10, 2, run_seed=7))
    state = {k: v.clone() for k, v in first.state.items()}
    first.aggregate(0, [(0, _delta(state, 0.01, 1)), (1, _delta(state, 0.01, 2))])
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    other = FedIT(FedConfig(), _adapter(), Privacy(DPConfig(noise=1.0), 10, 2, run_seed=7))
    assert other.server.privacy.secret != first.server.privacy.secret
    other.load_state_dict(saved)
    # Execute: round 2 on both
    updates = [(0, _delta(state, 0.01, 3)), (1, _delta(state, 0.01, 4))]
    first.aggregate(1, updates)
    other.aggregate(1, updates)
    # Assert: the same noise, so the same global adapter
    assert all(torch.equal(first.state[k], other.state[k]) for k in first.state)


def test_a_budget_stops_the_run_before_the_round_that_would_exceed_it(tmp_path, federate_args):
    out = tmp_path / "dp"
    args = federate_args(out, "--method", "fo", "dp.noise=1.0", "dp.epsilon=1.2", rounds=4)
    assert main(args) == 0
    rows = RunDir(out, resume=True).read_metrics()
    summary = json.loads((out / "summary.json").read_text())
    done = summary["dp"]["rounds"]
    assert 0 < done < 4 and [r["round"] for r in rows] == list(range(done + 1))
    assert all(r["epsilon"] <= 1.2 for r in rows[1:]) and summary["dp"]["epsilon"] <= 1.2
    assert summary["status"] == "stopped: privacy budget"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["dp.noise=-1"], r"dp\.noise: expected a finite number >= 0"),
        (["dp.noise=1", "dp.epsilon=0"], r"dp\.epsilon: a budget must be a number > 0"),
        (["dp.clip=2"], r"dp\.clip=2\.0 is read only with differential privacy on"),
        (["dp.noise=1", "fed.aggregator=median"], r"fed\.aggregator='median' would void"),
        (["dp.noise=1", "fed.ranks=2,4"], r"fed\.ranks='2,4' would void"),
    ],
)
def test_privacy_settings_that_are_wrong_or_void_the_guarantee_are_refused(
    tmp_path, federate_args, capsys, extra, message
):
    out = tmp_path / "never"
    assert main(federate_args(out, "--method", "fo", *extra)) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_an_algorithm_without_private_aggregation_is_refused():
    with pytest.raises(ConfigError, match="cannot clip and noise its aggregate"):
        resolve_config(FederateConfig, None, ["dp.noise=1"], {"fed.algorithm": "fedspine"})
