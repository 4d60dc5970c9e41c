"""`edgetune flower run` honours every setting it accepts, or refuses it before launch.

Settings only the simulator honours (its clock, its attacks) exit 2 before any Flower
process starts; local paths given relative to the working directory reach the ServerApp
and the ClientApps (which start in other folders) as absolute paths; and a ServerApp
that fails makes the command fail with the ServerApp's own error first. The federation
is real (a SuperLink and two SuperNodes on 127.0.0.1), stopped by PID when the module
ends.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from edgetune.cli import main
from edgetune.flower.local import CONNECTION, SERVER_ERROR, LocalFederation
from edgetune.runs import RunDir

FLEET = "fleet:\n  - {name: board, memory_mb: 48000, gflops: 100, up_mbps: 10, down_mbps: 10}\n"
ROWS = "sentence,label\n" + "a fine film,good\na dull film,bad\n" * 20


def flower_run(model, out, *extra):
    """A seconds-long `edgetune flower run`: 2 clients, 1 round, `extra` flags last."""
    return [
        "flower",
        "run",
        "--model",
        str(model),
        "--clients",
        "2",
        "--participation",
        "1",
        "--rounds",
        "1",
        "--local-steps",
        "2",
        "--batch-size",
        "4",
        "--method",
        "fo",
        "--out",
        str(out),
        "data.eval_size=8",
        "data.max_length=32",
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["fed.deadline_s=30"], r"fed\.deadline_s=30\.0 is a simulator setting .*round-timeout"),
        (["fed.host_gflops=50"], r"fed\.host_gflops=50\.0 is a simulator setting .*own speed"),
        (
            ["--algorithm", "fedspine", "fed.deadline_s=30", "spine.deadline_penalty=2"],
            r"fed\.deadline_s=30\.0 .*spine\.deadline_penalty would never apply",
        ),
        (["fed.attack=signflip:0.5"], r"fed\.attack='signflip:0\.5' .*devices are real"),
    ],
    ids=["deadline", "host-gflops", "fedspine-deadline-penalty", "attack"],
)
def test_simulator_settings_are_refused_before_anything_starts(
    tmp_path, capfd, stories260k_path, extra, message
):
    # Prepare
    home, out = tmp_path / "home", tmp_path / "run"
    local = ["--local", "2", "--insecure", "--home", str(home), "--dataset", "sst2"]
    # Execute
    status = main(flower_run(stories260k_path, out, *local, *extra))
    # Assert
    err = capfd.readouterr().err
    assert status == 2, err
    assert re.search(message, err) and "drop it, or run the simulated federation" in err, err
    assert "Traceback" not in err
    assert not home.exists() and not out.exists()  # no federation, no run directory


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = LocalFederation(tmp_path_factory.mktemp("flwr-home"), clients=2, insecure=True)
    with fed:
        yield fed


@pytest.mark.integration
def test_relative_paths_reach_the_server_and_the_clients(
    tmp_path, monkeypatch, federation, stories260k_path
):
    # Prepare: model, data and fleet named relative to this working directory only
    shutil.copytree(stories260k_path, tmp_path / "model")
    (tmp_path / "mydata.csv").write_text(ROWS)
    (tmp_path / "fleet.yaml").write_text(FLEET)
    monkeypatch.chdir(tmp_path)
    at = ["--home", str(federation.home), "--connection", CONNECTION]
    paths = ["--dataset", "mydata.csv", "--fleet", "fleet.yaml", "fed.partition=iid"]
    # Execute
    status = main(flower_run("model", "run", *at, *paths))
    # Assert: the run finished on both clients, reading the files the paths name here
    assert status == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"] == str(tmp_path / "model")
    assert saved["data"]["dataset"] == str(tmp_path / "mydata.csv")
    assert saved["fed"]["fleet"] == str(tmp_path / "fleet.yaml")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 1 and 0.0 <= summary["eval/accuracy"] <= 1.0
    clients = RunDir(tmp_path / "run", resume=True).read_metrics("clients.jsonl")
    assert [c["status"] for c in clients] == ["ok", "ok"]


@pytest.mark.integration
def test_a_failing_server_app_fails_the_command_with_its_error(
    tmp_path, capfd, federation, stories260k_path
):
    # Prepare: a data file that does not exist, so the ServerApp's setup fails
    at = ["--home", str(federation.home), "--connection", CONNECTION, "--wait-nodes", "30"]
    missing = tmp_path / "missing.csv"
    # Execute
    status = main(flower_run(stories260k_path, tmp_path / "run", *at, "--dataset", str(missing)))
    # Assert: exit 2, and the first line of the message is the ServerApp's own error
    err = capfd.readouterr().err
    assert status == 2, err
    line = next(x for x in err.splitlines() if x.startswith("edgetune flower: error:"))
    assert line.startswith("edgetune flower: error: the Flower ServerApp stopped: ")
    assert str(missing) in line
    assert (tmp_path / "run" / SERVER_ERROR).read_text() in err
    assert not (tmp_path / "run" / "summary.json").exists()
