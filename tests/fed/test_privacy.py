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


def test_fedproj_clips_each_fitted_update_and_noises_every_coefficient():
    from edgetune.fed.algorithms.fedproj import FedProj, rebuilt_norm
    from edgetune.fed.payloads import Projection

    fed = FedConfig(algorithm="fedproj", proj_k=16, max_update_norm=1e9)
    quiet = Privacy(DPConfig(noise=1e-12, clip=0.5), 10, 2, run_seed=0)
    algo = FedProj(fed, _adapter(), 0, quiet)
    sizes = algo.layout.sizes().double()
    huge = Projection(algo.round_seed(0), torch.full((16,), 100.0), algo.layout.numel, 4, {})
    # the mean's coefficients (step / (server_lr n_b)) fit an update of norm clip / m
    mean = algo.combine([huge], rnd=0).double() / sizes
    assert rebuilt_norm(mean, algo.layout) == pytest.approx(0.5 / 2, rel=1e-6)
    assert torch.nn.functional.cosine_similarity(mean * sizes.sqrt(), sizes.sqrt(), dim=0) > 0.999
    # noise on every coefficient: std sigma clip / m of the fitted coordinates
    algo.privacy = Privacy(DPConfig(noise=1.0, clip=0.5), 10, 2, run_seed=0)
    still = Projection(huge.seed, torch.zeros(16), algo.layout.numel, 4, {})
    noise = algo.combine([still], rnd=0).double() / sizes.sqrt()
    assert bool((noise != 0).all()) and 0.1 < float(noise.std()) < 0.5  # expected 0.25
    assert "dp.secret" in algo.state_dict()


def test_fedproj_under_central_dp_runs_from_the_cli_and_accounts_every_round(
    tmp_path, federate_args
):
    out = tmp_path / "proj"
    args = federate_args(out, "--method", "fo", "dp.noise=0.5", algorithm="fedproj")
    assert main([*args, "fed.proj_k=64"]) == 0
    rows = RunDir(out, resume=True).read_metrics()
    expected = Privacy(DPConfig(noise=0.5), 5, 3, run_seed=0).epsilon(2)
    assert rows[-1]["epsilon"] == pytest.approx(expected)
    assert [r["accepted"] for r in rows[1:]] == [3, 3]


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
    # FedProj's clients cannot noise their own coefficients (central DP only)
    with pytest.raises(ConfigError, match="dp.where=device: the clients of fed.algorithm=fedproj"):
        resolve_config(
            FederateConfig, None, ["dp.noise=1", "dp.where=device"], {"fed.algorithm": "fedproj"}
        )


# --- local DP (dp.where=device) ---------------------------------------------------------


def test_local_dp_counts_every_round_at_half_the_noise_multiplier():
    # A device's two datasets give clipped updates up to 2C apart (sigma / 2), and the
    # server knows when it selected the device (no amplification by sampling).
    sigma, rounds = 2.0, 10
    local = Privacy(DPConfig(noise=sigma, where="device"), 40, 4, run_seed=0)
    unsampled_half = Privacy(DPConfig(noise=sigma / 2), 40, 40, run_seed=0)
    central = Privacy(DPConfig(noise=sigma), 40, 4, run_seed=0)
    assert local.epsilon(rounds) == pytest.approx(unsampled_half.epsilon(rounds), rel=1e-12)
    assert local.epsilon(rounds) > central.epsilon(rounds)


def test_a_device_clips_and_noises_its_update_from_its_own_seed():
    privacy = Privacy(DPConfig(noise=0.5, clip=0.1, where="device"), 10, 2, run_seed=0)
    update = {"a": torch.full((100, 100), 3.0), "b": torch.full((50,), -4.0)}
    # Execute
    once = privacy.privatize(update, seed=11)
    again = privacy.privatize(update, seed=11)
    other = privacy.privatize(update, seed=12)
    # Assert: the same seed gives the same release, another seed another one
    assert all(torch.equal(once[k], again[k]) for k in update)
    assert not torch.equal(once["a"], other["a"])
    # ... the clean part is the update clipped to 0.1, the rest noise of std 0.5 x 0.1
    quiet = Privacy(DPConfig(noise=1e-12, clip=0.1, where="device"), 10, 2, run_seed=0)
    clipped = quiet.privatize(update, seed=11)
    assert sum(float(t.pow(2).sum()) for t in clipped.values()) ** 0.5 == pytest.approx(0.1)
    noise = torch.cat([(once[k] - clipped[k]).flatten() for k in update])
    assert float(noise.std()) == pytest.approx(0.05, rel=0.05)


def test_a_local_dp_server_averages_noised_updates_without_clipping_or_noise():
    adapter = _adapter()
    privacy = Privacy(DPConfig(noise=1.0, clip=0.1, where="device"), 10, 4, run_seed=0)
    algo = FedIT(FedConfig(max_update_norm=1.0), adapter, privacy)
    before = {k: v.clone() for k, v in algo.state.items()}
    numel = sum(v.numel() for v in before.values())
    noised = [
        (c, LoraDelta(privacy.privatize(_delta(before, 1.0, c).tensors, c), 4)) for c in range(2)
    ]
    # Execute: updates whose norm (noise) is far past fed.max_update_norm=1.0
    result = algo.aggregate(0, noised)
    # Assert: accepted (an honest noised update reaches privacy.update_bound), and the
    # step is their sum over the 4 clients selected a round, untouched
    assert result.accepted == [0, 1] and privacy.update_bound(numel) > 1.0
    for k in before:
        expected = before[k] + (noised[0][1].tensors[k] + noised[1][1].tensors[k]) / 4
        assert torch.allclose(algo.state[k], expected, atol=1e-6)


def test_a_zo_device_releases_its_noised_delta_and_keeps_its_secret():
    from types import SimpleNamespace

    from edgetune.fed.algorithms.base import load_trainable, trainable_state
    from edgetune.fed.algorithms.deltas import DEVICE_SECRET, release
    from edgetune.fed.payloads import ClientState, SeedTrace

    adapter = _adapter()
    broadcast = LoraDelta(trainable_state(adapter))
    trained = {k: v + 0.01 for k, v in broadcast.tensors.items()}
    load_trainable(adapter, trained)  # the adapter holds what the device's steps made
    privacy = Privacy(DPConfig(noise=1e-12, clip=1e6, where="device"), 10, 2, run_seed=0)
    job = SimpleNamespace(round=3, client=1)
    trace = SeedTrace([1, 2], [0.1, 0.2], 4)
    # Execute
    update, secret = release(privacy, trace, adapter, broadcast, job, None)
    # Assert: a dense delta (a trace replays exactly, so it cannot carry noise)
    assert isinstance(update, LoraDelta) and update.num_examples == 4
    assert all(
        torch.allclose(update.tensors[k], torch.full_like(v, 0.01), atol=1e-5)
        for k, v in trained.items()
    )
    # ... and the device's next round with its kept secret draws from the same stream
    loud = Privacy(DPConfig(noise=1.0, clip=1e6, where="device"), 10, 2, run_seed=0)
    state = ClientState({DEVICE_SECRET: secret})
    first, _ = release(loud, trace, adapter, broadcast, job, state)
    second, kept = release(loud, trace, adapter, broadcast, job, state)
    other = SimpleNamespace(round=3, client=2)
    other_device, _ = release(loud, trace, adapter, broadcast, other, None)
    assert torch.equal(kept, secret)
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
    assert not all(torch.equal(first.tensors[k], other_device.tensors[k]) for k in first.tensors)
    # a device's secret is its own process's (here: a Privacy of another secret)
    elsewhere = Privacy(DPConfig(noise=1.0, where="device"), 10, 2, run_seed=0)
    assert elsewhere.device_secret(1) != loud.device_secret(1)


def test_local_dp_runs_from_the_cli_and_a_resume_replays_the_devices_noise(tmp_path, federate_args):
    # Prepare: one round, copied; both copies resumed to two rounds
    args = ("--method", "fo", "dp.noise=0.5", "dp.clip=1.0", "dp.where=device")
    first = tmp_path / "a"
    assert main(federate_args(first, *args, rounds=1)) == 0
    copy = tmp_path / "b"
    import shutil

    shutil.copytree(first, copy)
    # Execute
    for run in (first, copy):
        assert main(["federate", "--resume", str(run), "fed.rounds=2"]) == 0
    # Assert: every round accounted with the local rule; the two resumes are identical
    rows = RunDir(first, resume=True).read_metrics()
    expected = Privacy(DPConfig(noise=0.5, where="device"), 5, 3, run_seed=0).epsilon(2)
    assert rows[-1]["epsilon"] == pytest.approx(expected)
    assert [r["accepted"] for r in rows[1:]] == [3, 3]
    a = (first / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == (copy / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["dp.noise=1", "dp.where=edge"], r"dp\.where: 'edge' is not one of server, device"),
        (["dp.where=device"], r"dp\.where='device' is read only with differential privacy"),
    ],
)
def test_local_dp_settings_that_are_wrong_are_refused(
    tmp_path, federate_args, capsys, extra, message
):
    assert main(federate_args(tmp_path / "never", "--method", "fo", *extra)) == 2
    assert re.search(message, capsys.readouterr().err)


def test_an_algorithm_whose_clients_cannot_noise_refuses_local_dp():
    with pytest.raises(ConfigError, match="dp.where=device: the clients of fed.algorithm=fedkseed"):
        resolve_config(
            FederateConfig,
            None,
            ["dp.noise=1", "dp.where=device", "fed.method=zo"],
            {"fed.algorithm": "fedkseed"},
        )
