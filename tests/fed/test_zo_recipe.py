"""The default ZO recipe in a federation: zeroth-order fleets get RECIPE_LR with normalised
scalars when no step size is given, and the normalised traces still replay exactly."""

from __future__ import annotations

import math

import pytest
import torch

from edgetune.fed.algorithms.base import trainable_state
from edgetune.fed.algorithms.fedkseed import FedKSeed
from edgetune.fed.config import FedConfig, FederateConfig
from edgetune.fed.fleet import BUILTIN_PROFILES
from edgetune.fed.plan import ClientPlan
from edgetune.train import OptimConfig
from edgetune.train.config import DEFAULT_LR, RECIPE_LR
from edgetune.zo import ZOConfig

BOUND = 1.0 / math.sqrt(1.0 - 0.9)  # |c'| of a normalised scalar (zo/normalize.py, beta 0.9)


@pytest.mark.parametrize(
    ("algorithm", "method", "lr", "scale", "expected"),
    [
        ("fedkseed", "auto", None, "auto", (RECIPE_LR, "rms")),  # forward-only: the recipe
        ("fwdllm", "auto", None, "auto", (RECIPE_LR, "rms")),
        ("fedit", "zo", None, "auto", (RECIPE_LR, "rms")),  # every client zeroth-order
        ("fedkseed", "auto", 2e-3, "auto", (2e-3, "none")),  # a given lr keeps raw scalars
        ("fedkseed", "auto", None, "none", (DEFAULT_LR["zo"], "none")),
        ("fedit", "auto", None, "auto", (DEFAULT_LR["fo"], "none")),  # mixed: fo's default
        ("fedit", "auto", None, "rms", (DEFAULT_LR["fo"], "rms")),  # ZO devices told to
    ],
)
def test_a_zeroth_order_fleet_without_a_step_size_gets_the_recipe(
    algorithm, method, lr, scale, expected
):
    cfg = FederateConfig(
        fed=FedConfig(algorithm=algorithm, method=method),
        optim=OptimConfig(lr=lr),
        zo=ZOConfig(scale=scale),
    )
    assert (cfg.optim.lr, cfg.zo.scale) == expected


def test_normalised_fedkseed_traces_are_bounded_and_the_server_replays_the_client(
    stories260k_path, shared_data
):
    del shared_data
    from edgetune import models
    from edgetune.data import DataConfig, build_task, load_splits
    from edgetune.fed.local import ClientJob
    from edgetune.peft import PeftConfig, attach

    model, tokenizer = models.load(str(stories260k_path))
    adapter = attach(model, PeftConfig(), seed=0)
    data = DataConfig(dataset="sst2", train_size=32, eval_size=8, max_length=32)
    splits = load_splits(data, 0)
    task = build_task(splits, data, tokenizer)
    cfg = FederateConfig(fed=FedConfig(algorithm="fedkseed", pool_size=64))
    server = FedKSeed(cfg.fed, adapter, seed=5, lr=cfg.optim.lr)
    plan = ClientPlan(0, BUILTIN_PROFILES["rpi5"], "zo", None)
    rows, steps = task.prepare_rows(splits.train), cfg.fed.local_steps
    job = ClientJob(0, 0, "zo", task, rows, steps, 4, cfg.optim.lr, 11, cfg.optim, cfg.zo)
    trace, _ = server.client_update(adapter, server.configure(0, plan), job, None)
    # The first step's single scalar normalises to +-1; every one stays within the bound.
    assert abs(abs(trace.scalars[0]) - 1.0) < 1e-12
    assert all(abs(c) <= BOUND + 1e-9 for c in trace.scalars)
    local = trainable_state(adapter)
    assert server.aggregate(0, [(0, trace)]).accepted == [0]
    moved = max(float((server.state[k] - server.initial[k]).abs().max()) for k in local)
    assert moved > 0.0
    assert all(torch.allclose(server.state[k], local[k], atol=1e-7) for k in local)
