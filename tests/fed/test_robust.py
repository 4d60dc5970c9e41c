"""Robust federated aggregation: FedKSeed's rules on sparse seed scalars, example counts
that cannot buy influence, bounds that NaN cannot switch off, and simulated attackers
through the real wire (`fed.attack`)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from edgetune.cli import main
from edgetune.errors import ConfigError
from edgetune.fed.aggregate import clip_scale, norm_outliers
from edgetune.fed.algorithms.fedit import FedIT
from edgetune.fed.algorithms.fedkseed import FedKSeed
from edgetune.fed.attacks import LIE, SCALE, Attack, attackers, corrupt, parse_attack
from edgetune.fed.config import FedConfig
from edgetune.fed.payloads import LoraDelta, SeedTrace, ZOTrace, decode, encode
from edgetune.fed.validate import cap_examples, check_delta, check_trace
from edgetune.models import tiny_llama
from edgetune.peft import PeftConfig, attach
from edgetune.runs import RunDir

LR = 0.01


def _adapter():
    return attach(tiny_llama(seed=3), PeftConfig(rank=2), seed=0)


def _honest_traces(count: int, steps: int = 5) -> list[tuple[int, ZOTrace]]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for c in range(count):
        idx = torch.randint(1024, (steps,), generator=gen).tolist()
        scalars = torch.randn(steps, generator=gen).tolist()
        out.append((c, ZOTrace(idx, scalars, [LR] * steps, 20)))
    return out


def _kseed(rule: str, **kw) -> FedKSeed:
    cfg = FedConfig(algorithm="fedkseed", aggregator=rule, trim=0.1, **kw)
    return FedKSeed(cfg, _adapter(), seed=0, lr=LR)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_fedkseed_robust_rules_reject_big_scalars_that_pass_the_bound(rule):
    # Prepare: 8 honest clients and 2 sending scalars just under the 1e4 bound
    honest = _honest_traces(8)
    attack = [(c, ZOTrace([1, 2, 3, 4, 5], [-9990.0] * 5, [LR] * 5, 20)) for c in (8, 9)]
    server, plain = _kseed(rule), _kseed("mean")
    # Execute
    result = server.aggregate(0, [*honest, *attack])
    plain.aggregate(0, [*honest, *attack])
    # Assert: the attackers are rejected with the reason, every accumulated scalar stays
    # within lr x the largest honest scalar; the plain mean takes the attack in
    assert sorted(result.rejected) == [8, 9] and "outlier" in result.rejected[8]
    largest = max(abs(s) for _, t in honest for s in t.scalars)
    assert max(abs(a) for a in server.history[-1]) <= LR * largest
    assert max(abs(a) for a in plain.history[-1]) > 100 * LR


def test_fedkseed_median_clips_every_client_to_the_median_norm():
    # Prepare: 5 clients of norm 1, one of norm 5 (a 5x boost, under the outlier ratio)
    traces = [(c, ZOTrace([10 * c], [1.0], [LR], 20)) for c in range(5)]
    traces.append((5, ZOTrace([60], [5.0], [LR], 20)))
    server = _kseed("median")
    # Execute
    result = server.aggregate(0, traces)
    # Assert: accepted, but counted with the median norm (1), each client 1/6 of the step
    acc = server.history[-1]
    assert not result.rejected
    assert acc[60] == pytest.approx(LR * 1.0 / 6) and acc[0] == pytest.approx(LR / 6)


def test_fedkseed_trimmed_mean_drops_the_largest_norms():
    traces = [(c, ZOTrace([c], [float(c + 1)], [LR], 20)) for c in range(10)]
    server = _kseed("trimmed-mean")
    server.aggregate(0, traces)
    acc = server.history[-1]
    assert acc[9] == 0.0 and acc[8] == pytest.approx(LR * 9.0 / 9)  # 10 - int(0.1 x 10)


def test_fedkseed_server_decides_the_learning_rate():
    # Prepare: one honest trace, one claiming a 100x learning rate
    honest = ZOTrace([3], [2.0], [LR], 10)
    greedy = ZOTrace([4], [2.0], [1.0], 10)
    server = _kseed("mean")
    # Execute: the honest trace went over the wire (float32 lr)
    result = server.aggregate(0, [(0, decode(encode(honest))), (1, greedy)])
    # Assert
    assert result.accepted == [0] and "differs from the run's" in result.rejected[1]
    assert server.history[-1][3] == pytest.approx(LR * 2.0)


def test_fedkseed_rejects_a_trace_longer_than_a_round():
    server = _kseed("mean", local_steps=2)
    result = server.aggregate(0, [(0, ZOTrace([1, 2, 3], [1.0] * 3, [LR] * 3, 10))])
    assert "3 steps in a round of fed.local_steps=2" in result.rejected[0]


def test_norm_outliers_spare_honest_spread_and_small_rounds():
    assert norm_outliers([1.0, 3.0, 0.5, 2.0, 5.0]) == [None] * 5
    assert norm_outliers([1.0, 1e4]) == [None, None]
    flags = norm_outliers([1.0, 1.2, 0.9, 1.1, 30.0])
    assert flags[:4] == [None] * 4 and "27.3x the round's median 1.1" in flags[4]


def test_a_claimed_example_count_cannot_buy_influence_in_fedit():
    # Prepare: 4 honest deltas of 10 examples and a sign-flipped one claiming 10^9
    adapter = _adapter()
    algo = FedIT(FedConfig(), adapter)
    state = {k: v.clone() for k, v in algo.state.items()}
    gen = torch.Generator().manual_seed(0)
    honest = [
        (
            c,
            LoraDelta(
                {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in state.items()}, 10
            ),
        )
        for c in range(4)
    ]
    liar = LoraDelta({k: -4 * v for k, v in honest[0][1].tensors.items()}, LIE)
    # Execute: the transport caps the count at the client's partition (10 rows)
    note = cap_examples(liar, 10)
    algo.aggregate(0, [*honest, (4, liar)])
    # Assert: the lie is noted and weighs like any 10-example client
    assert note == f"num_examples {LIE} capped at 10 (the client's partition)"
    for name in state:
        deltas = [u.tensors[name] for _, u in honest] + [liar.tensors[name]]
        expected = state[name] + sum(deltas) / 5
        assert torch.allclose(algo.state[name], expected, atol=1e-7)


def test_a_nan_bound_never_switches_validation_off():
    # Prepare: a config object whose bounds were forced to NaN after validation
    adapter = _adapter()
    cfg = FedConfig()
    cfg.max_update_norm = math.nan
    algo = FedIT(cfg, adapter)
    big = LoraDelta({k: torch.full_like(v, 1e4) for k, v in algo.state.items()}, 10)
    # Execute / Assert: every check raises instead of accepting
    with pytest.raises(ConfigError, match="max_update_norm: expected a finite number > 0"):
        algo.aggregate(0, [(0, big)])
    with pytest.raises(ConfigError, match="max_update_norm"):
        check_delta(big, algo.state, math.nan)
    with pytest.raises(ConfigError, match="max_abs_scalar"):
        check_trace(ZOTrace([1], [1e9], [LR], 1), 8, math.nan)
    with pytest.raises(ConfigError, match="clip"):
        clip_scale(5.0, math.nan)
    for field in ("max_update_norm", "max_abs_scalar", "clip", "server_lr", "trim"):
        for bad in (math.nan, math.inf):
            with pytest.raises(ConfigError, match=f"fed.{field}"):
                FedConfig(**{field: bad})


@pytest.mark.parametrize(
    "spec, algorithm, message",
    [
        ("signflip", "fedit", "fraction in \\(0, 1\\)"),
        ("signflip:1.5", "fedit", "fraction in \\(0, 1\\)"),
        ("signflip:nan", "fedit", "fraction in \\(0, 1\\)"),
        ("flood:0.2", "fedit", "unknown attack 'flood'"),
        ("big-scalar:0.2", "fedit", "only fedkseed and fedkseed-pro"),
        ("big-scalar:0.2", "fwdllm", "only fedkseed and fedkseed-pro"),
        ("big-scalar:0.2", "fedproj", "only fedkseed and fedkseed-pro"),
    ],
)
def test_attack_settings_are_checked(spec, algorithm, message):
    with pytest.raises(ConfigError, match=message):
        FedConfig(algorithm=algorithm, attack=spec)


def test_attackers_are_a_seeded_subset():
    attack = parse_attack("noise:0.2")
    assert attack == Attack("noise", 0.2)
    chosen = attackers(attack, 10, seed=3)
    assert len(chosen) == 2 and chosen == attackers(attack, 10, seed=3)
    assert chosen != attackers(attack, 10, seed=4) or len(attackers(attack, 10, seed=5)) == 2
    assert attackers(None, 10, seed=3) == set()


def test_each_attack_corrupts_the_honest_update():
    delta = LoraDelta({"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[0.5]])}, 7)
    trace = ZOTrace([1, 2], [0.5, -3.0], [LR, LR], 7)
    seeds = SeedTrace([11, 12], [0.25, -1.0], 7)

    def hit(update, kind):
        return corrupt(update, Attack(kind, 0.2), 0, 1, 2, 1e4)

    assert torch.equal(hit(delta, "signflip").tensors["a"], torch.tensor([-1.0, 2.0]))
    assert torch.equal(hit(delta, "scale").tensors["b"], torch.tensor([[0.5 * SCALE]]))
    assert math.isnan(hit(delta, "nan").tensors["a"][0])
    liar = hit(delta, "lie-count")
    assert liar.num_examples == LIE and torch.equal(liar.tensors["a"], -delta.tensors["a"])
    noisy = hit(delta, "noise").tensors["a"]
    assert noisy.shape == (2,) and not torch.equal(noisy, delta.tensors["a"])
    assert torch.equal(noisy, hit(delta, "noise").tensors["a"])  # seeded
    assert hit(trace, "big-scalar").scalars == [-9990.0, 9990.0]
    assert hit(trace, "signflip").scalars == [-0.5, 3.0] and trace.scalars == [0.5, -3.0]
    assert hit(seeds, "scale").coefs == [0.25 * SCALE, -1.0 * SCALE]
    assert math.isnan(hit(seeds, "nan").coefs[0]) and hit(seeds, "nan").seeds == [11, 12]


@pytest.fixture
def kseed_args(stories260k_path, shared_data, tmp_path):
    del shared_data

    def make(name, *extra):
        return [
            "federate",
            "--model",
            str(stories260k_path),
            "--dataset",
            "sst2",
            "--algorithm",
            "fedkseed",
            "--method",
            "zo",
            "--clients",
            "5",
            "--participation",
            "1.0",
            "--partition",
            "iid",
            "--fleet",
            "jetson-agx-orin",
            "--rounds",
            "2",
            "--local-steps",
            "3",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / name),
            "data.train_size=60",
            "data.eval_size=16",
            "data.max_length=32",
            *extra,
        ]

    return make


def test_simulated_big_scalar_attackers_go_through_the_wire_and_are_rejected(tmp_path, kseed_args):
    # Prepare / Execute: honest and 40 % big-scalar attackers under the median rule
    assert main(kseed_args("honest", "fed.aggregator=median")) == 0
    attacked = ["fed.aggregator=median", "fed.attack=big-scalar:0.4"]
    assert main(kseed_args("attacked", *attacked)) == 0
    assert main(kseed_args("mean", "fed.attack=big-scalar:0.4")) == 0
    # Assert: attackers are marked and each of their updates rejected with the reason;
    # the model stays near the honest one, while the plain mean is wrecked
    rows = {n: RunDir(tmp_path / n, resume=True).read_metrics() for n in ("honest", "attacked")}
    clients = RunDir(tmp_path / "attacked", resume=True).read_metrics("clients.jsonl")
    marked = [c for c in clients if c.get("attack") == "big-scalar"]
    assert len(marked) == 4 and len({c["client"] for c in marked}) == 2
    assert all(c["status"].startswith("rejected: update norm") for c in marked)
    assert all(c["status"] == "ok" for c in clients if "attack" not in c)
    honest, attacked_loss = rows["honest"][-1]["eval/loss"], rows["attacked"][-1]["eval/loss"]
    assert abs(attacked_loss - honest) < 0.1 * honest  # 3 honest clients of 5 remain
    # the plain mean took the attackers' steps: its adapter is far from the honest one
    adapters = {
        n: load_file(tmp_path / n / "adapter" / "adapter_model.safetensors")
        for n in ("honest", "attacked", "mean")
    }

    def distance(name):
        a, b = adapters[name], adapters["honest"]
        return sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a) ** 0.5

    assert distance("mean") > 100 * max(distance("attacked"), 1e-6)


def test_simulated_lie_count_is_capped_at_the_partition(tmp_path, kseed_args):
    assert main(kseed_args("liar", "fed.attack=lie-count:0.2")) == 0
    clients = RunDir(tmp_path / "liar", resume=True).read_metrics("clients.jsonl")
    liars = [c for c in clients if c.get("attack") == "lie-count"]
    assert len(liars) == 2
    assert all(
        c["note"] == f"num_examples {LIE} capped at 12 (the client's partition)" for c in liars
    )
    assert not any("note" in c for c in clients if "attack" not in c)


def test_alie_and_ipm_hide_inside_the_honest_spread():
    honest = [
        LoraDelta({"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(c))}, 4)
        for c in range(4)
    ]
    stacked = torch.stack([h.tensors["w"] for h in honest]).double()
    alie = corrupt(honest[0], Attack("alie", 0.2), 0, 0, 9, 1e4, honest)
    ipm = corrupt(honest[0], Attack("ipm", 0.2), 0, 0, 9, 1e4, honest)
    want = stacked.mean(0) - stacked.std(0, correction=0)
    assert torch.allclose(alie.tensors["w"].double(), want, atol=1e-6)
    assert torch.allclose(ipm.tensors["w"].double(), -0.5 * stacked.mean(0), atol=1e-6)
    # each coordinate within one honest standard deviation of the honest mean
    assert bool(
        (
            (alie.tensors["w"].double() - stacked.mean(0)).abs()
            <= stacked.std(0, correction=0) + 1e-6
        ).all()
    )


def test_centered_clipping_bounds_a_far_attacker_and_keeps_close_honest_updates():
    from edgetune.fed.aggregate import CC_ITERATIONS, centered_clip

    honest = [torch.full((10,), 0.01 * (i + 1)) for i in range(4)]
    far = torch.full((10,), 1e6)
    out = centered_clip([*honest, far], torch.zeros(10), tau=1.0)
    # the far client moves the aggregate by at most tau / n per iteration
    assert float(out.norm()) <= float(torch.stack(honest).mean(0).norm()) + CC_ITERATIONS * 1.0 / 5
    close = centered_clip(honest, torch.zeros(10), tau=1.0)
    assert torch.allclose(close, torch.stack(honest).mean(0), atol=1e-6)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"algorithm": "fedkseed", "aggregator": "centered-clip"}, "use one of mean"),
        ({"bucket": 1}, "bucket size >= 2"),
        (
            {"bucket": 2},
            r"fed.bucket=2 is not read by fed.algorithm=fedit with fed.aggregator=mean",
        ),
        ({"aggregator": "centered-clip", "ranks": "2,4"}, "whole updates"),
    ],
)
def test_defence_settings_are_checked(flags, message):
    with pytest.raises(ConfigError, match=message):
        FedConfig(**flags)


def test_fedit_with_centered_clipping_and_buckets_bounds_a_boosted_attacker():
    adapter = _adapter()
    cfg = FedConfig(aggregator="centered-clip", bucket=2, clip=0.05, max_update_norm=1e6)
    algo = FedIT(cfg, adapter)
    state = {k: v.clone() for k, v in algo.state.items()}

    def delta(scale, seed):
        gen = torch.Generator().manual_seed(seed)
        return LoraDelta(
            {k: torch.randn(v.shape, generator=gen) * scale for k, v in state.items()}, 4
        )

    honest = [(c, delta(0.001, c)) for c in range(4)]
    algo.aggregate(0, [*honest, (4, delta(10.0, 99))])
    moved = math.sqrt(sum(float((algo.state[k] - state[k]).pow(2).sum()) for k in state))
    assert moved <= 3 * 0.05  # CC_ITERATIONS steps of at most tau each
    assert "cc.center" in algo.state_dict()
