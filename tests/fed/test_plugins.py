"""The algorithm registry as a plugin house: a toy algorithm registered from a test
federates in the simulator, installed as an entry point it federates on Flower, and every
registered algorithm reads what it declares and is refused what it does not."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edgetune.cli import main
from edgetune.config import resolve_config
from edgetune.errors import ConfigError
from edgetune.fed.algorithms import ALGORITHMS, build_algorithm
from edgetune.fed.config import FedConfig, FederateConfig
from edgetune.fed.rounds import InProcessFleet, run_rounds
from edgetune.fed.session import setup
from edgetune.runs import RunDir

# A non-default value for every setting some algorithm declares (fed fields and dotted).
GIVEN = {
    "server_optimizer": "fedavgm",
    "server_lr": 0.5,
    "server_momentum": 0.5,
    "ranks": "2,4",
    "rank_aggregation": "svd",
    "max_update_norm": 50.0,
    "max_abs_scalar": 1e3,
    "pool_size": 64,
    "secret_pool": True,
    "proj_k": 16,
    "fwd_candidates": 2,
    "bucket": 2,
    "zo.max_queries": 6,
    "zo.var_threshold": 0.5,
}


@pytest.fixture
def toy():
    import toy_sign

    yield toy_sign.NAME
    ALGORITHMS.pop(toy_sign.NAME, None)
    import sys

    sys.modules.pop("toy_sign", None)


def test_every_declared_setting_has_a_value_here():
    declared = {s for spec in ALGORITHMS.values() for s in (*spec.settings, *spec.reads)}
    assert declared <= set(GIVEN), "give GIVEN a non-default value for each new setting"


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_settings_an_algorithm_does_not_declare_are_refused(name, stories260k_path):
    spec = ALGORITHMS[name]
    method = "zo" if spec.forward_only else "fo"
    for setting, value in GIVEN.items():
        if setting in spec.settings or setting in spec.reads:
            continue
        key = setting if "." in setting else f"fed.{setting}"
        flags = {"model": str(stories260k_path), "fed.algorithm": name, "fed.method": method}
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            resolve_config(FederateConfig, None, [f"{key}={value}"], flags)
    for other in ALGORITHMS.values():  # another algorithm's own section
        if other.section and other.section != spec.section:
            section = getattr(FederateConfig(), other.section)
            first = dataclasses.fields(section)[0]
            value = getattr(section, first.name)
            changed = value * 0.5 if isinstance(value, float) else value
            with pytest.raises(ConfigError, match=f"read only by fed.algorithm={other.name}"):
                resolve_config(
                    FederateConfig,
                    None,
                    [f"{other.section}.{first.name}={changed}"],
                    {"fed.algorithm": name, "fed.method": method},
                )


class Recording(FedConfig):
    """A `fed` section that records which settings are read."""

    def __getattribute__(self, name):
        if not name.startswith("_"):
            object.__getattribute__(self, "_read").add(name)
        return object.__getattribute__(self, name)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_setting_an_algorithm_declares_is_read(name, stories260k_path, tmp_path):
    # Prepare: a one-round federation of 2 stories260K clients, its fed section recorded
    spec = ALGORITHMS[name]
    flags = {
        "model": str(stories260k_path),
        "out": str(tmp_path / "run"),
        "data.dataset": "sst2",
        "fed.algorithm": name,
        "fed.method": "zo" if spec.forward_only else "fo",
        "fed.clients": 2,
        "fed.participation": 1.0,
        "fed.rounds": 1,
        "fed.local_steps": 1,
        "fed.fleet": "jetsons",
        "train.batch_size": 2,
        "train.progress": False,
    }
    overrides = ["data.train_size=20", "data.eval_size=4", "data.max_length=32"]
    fed = setup(resolve_config(FederateConfig, None, overrides, flags))
    recording = object.__new__(Recording)
    recording.__dict__.update(vars(fed.cfg.fed), _read=set())
    fed.cfg.fed = recording
    # Execute: build the algorithm and play the round
    algo = build_algorithm(fed)
    run_rounds(fed, algo, InProcessFleet(fed, algo), RunDir(tmp_path / "run", overwrite=True))
    # Assert: each declared fed setting was read by the algorithm or its planner
    unread = set(spec.settings) - recording._read
    assert not unread, f"{name} declares fed settings it never read: {sorted(unread)}"


def test_a_toy_algorithm_registered_in_a_test_federates(toy, tmp_path, federate_args):
    # Execute: the toy through the CLI, then with a setting only another algorithm reads
    out = tmp_path / "toy"
    assert main(federate_args(out, "--method", "fo", algorithm=toy)) == 0
    bad = main(federate_args(tmp_path / "bad", "--method", "fo", "fed.pool_size=64", algorithm=toy))
    # Assert: rounds ran and moved the adapter; the foreign setting was refused
    rows = RunDir(out, resume=True).read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["accepted"] > 0
    assert json.loads((out / "summary.json").read_text())["algorithm"] == toy
    assert bad == 2 and not (tmp_path / "bad" / "metrics.jsonl").exists()
