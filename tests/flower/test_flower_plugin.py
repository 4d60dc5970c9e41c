"""A federated algorithm installed as a plugin (an `edgetune.algorithms` entry point)
runs on real Flower processes as it does in the simulator: the SuperNodes and the
ServerApp find it the way a user's devices would, from the installed package."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgetune.config import resolve_config, to_dict
from edgetune.fed.algorithms import ALGORITHMS, load_plugins
from edgetune.flower.local import CONNECTION, LocalFederation, launch
from edgetune.recipes import federate
from edgetune.runs import RunDir

pytestmark = pytest.mark.integration

FLEET = "fleet:\n  - {name: board, memory_mb: 48000, gflops: 100, up_mbps: 10, down_mbps: 10}\n"
PLUGIN_DIR = Path(__file__).resolve().parents[1] / "fed"  # where toy_sign.py lives


def install_plugin(site: Path) -> None:
    """A minimal installed distribution whose entry point names the toy's module."""
    info = site / "edgetune_toy_sign-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: edgetune-toy-sign\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[edgetune.algorithms]\ntoy-sign = toy_sign\n")


def test_a_plugin_algorithm_runs_on_flower_as_in_the_simulator(
    tmp_path, monkeypatch, stories260k_path, shared_data
):
    del shared_data
    # Prepare: the plugin installed for this process and every Flower process it starts
    install_plugin(tmp_path / "site")
    paths = [str(tmp_path / "site"), str(PLUGIN_DIR)]
    monkeypatch.setenv("PYTHONPATH", ":".join([*paths, *sys.path]))
    for path in reversed(paths):
        monkeypatch.syspath_prepend(path)
    load_plugins()
    assert "toy-sign" in ALGORITHMS
    (tmp_path / "fleet.yaml").write_text(FLEET)

    def config(out: Path):
        flags = {
            "model": str(stories260k_path),
            "out": str(out),
            "data.dataset": "sst2",
            "fed.algorithm": "toy-sign",
            "fed.method": "fo",
            "fed.clients": 2,
            "fed.participation": 1.0,
            "fed.rounds": 2,
            "fed.local_steps": 2,
            "fed.fleet": str(tmp_path / "fleet.yaml"),
            "train.batch_size": 4,
        }
        overrides = ["data.train_size=60", "data.eval_size=8", "data.max_length=32"]
        return resolve_config(federate.FederateConfig, None, overrides, flags)

    try:
        # Execute: the same federation on Flower and in the simulator
        with LocalFederation(tmp_path / "home", clients=2, insecure=True) as fed:
            run = RunDir(tmp_path / "flower", overwrite=True)
            run.write_config(to_dict(config(run.path)))
            launch(run.path, fed.home, CONNECTION, round_timeout=300.0, wait_nodes=60.0)
            before = torch.get_num_threads()
            torch.set_num_threads(fed.node_threads)
            try:
                federate.run(config(tmp_path / "sim"))
            finally:
                torch.set_num_threads(before)
    finally:
        ALGORITHMS.pop("toy-sign", None)
        sys.modules.pop("toy_sign", None)
    # Assert: both ran every round with both clients accepted, to the same adapter
    rows = RunDir(tmp_path / "flower", resume=True).read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["accepted"] == 2 for r in rows[1:])
    a = load_file(tmp_path / "flower" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "sim" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # ... and the rounds moved it (LoRA B starts at zero)
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if "lora_B" in k)
