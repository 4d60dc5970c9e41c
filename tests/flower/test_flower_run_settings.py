"""`edgetune flower run` honours every setting it accepts, or refuses it before launch.

Settings only the simulator honours (its clock, its attacks) exit 2 before any Flower
process starts.
"""

from __future__ import annotations

import re

import pytest

from edgetune.cli import main


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
