"""Device profiles are validated where they are made: built-in, in Python or from YAML."""

from __future__ import annotations

import pytest

from edgetune.errors import ConfigError
from edgetune.fed.fleet import BUILTIN_PROFILES, DeviceProfile, load_fleet, round_seconds

GOOD = {"name": "dev", "memory_mb": 4000, "gflops": 100, "up_mbps": 12, "down_mbps": 50}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"up_mbps": 0}, r"up_mbps: expected a number > 0, got 0"),
        ({"down_mbps": -1.0}, r"down_mbps: expected a number > 0"),
        ({"memory_mb": "lots"}, r"memory_mb: expected a number > 0, got 'lots'"),
        ({"gflops": float("nan")}, r"gflops: expected a number > 0, got nan"),
        ({"gflops": float("inf")}, r"gflops: expected a number > 0, got inf"),
        ({"gflops": True}, r"gflops"),
        ({"availability": 2.5}, r"availability: expected a number in \(0, 1\], got 2.5"),
        ({"availability": 0}, r"availability"),
        ({"dropout": -1}, r"dropout: expected a number in \[0, 1\), got -1"),
        ({"dropout": 1.0}, r"dropout"),
        ({"lora_rank": 2.5}, r"lora_rank: expected an integer >= 0"),
        ({"name": ""}, r"name: expected a non-empty string"),
    ],
)
def test_a_profile_out_of_range_is_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        DeviceProfile(**{**GOOD, **change})


def test_every_builtin_profile_is_valid_and_a_good_one_builds():
    profile = DeviceProfile(**GOOD, availability=1.0, dropout=0.0, lora_rank=4)

    assert round_seconds(profile, 1.0, 10**6, 10**6, host_gflops=100) == pytest.approx(
        1.0 + 8 / 50 + 8 / 12
    )
    assert all(isinstance(p, DeviceProfile) for p in BUILTIN_PROFILES.values())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fleet: [\n", r"not valid YAML"),
        (
            "fleet:\n  - {name: dev, memory_gb: 4}\n",
            r"unknown field 'memory_gb' \(did you mean 'memory_mb'\?\)",
        ),
        ("fleet:\n  - {name: dev, memory_mb: 4000}\n", r"missing gflops, up_mbps, down_mbps"),
        ("fleet:\n  - 42\n", r"profile 0: expected a built-in profile name"),
        (
            "fleet:\n  - rpi5\n  - {name: x, memory_mb: 1, gflops: 1, up_mbps: 0, down_mbps: 1}\n",
            r"profile 1: device 'x': up_mbps",
        ),
    ],
)
def test_a_bad_fleet_file_names_the_profile_and_field(tmp_path, text, message):
    path = tmp_path / "fleet.yaml"
    path.write_text(text)

    with pytest.raises(ConfigError, match=message):
        load_fleet(str(path), 2)


def test_a_fleet_file_mixes_builtin_names_and_profiles(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "- rpi5\n- {name: dev, memory_mb: 4000, gflops: 100, up_mbps: 12, down_mbps: 50}\n"
    )

    fleet = load_fleet(str(path), 3)

    assert [p.name for p in fleet] == ["rpi5", "dev", "rpi5"]
    assert fleet[1].up_mbps == 12
