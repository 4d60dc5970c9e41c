"""`edgetune bench fed`: choosing rows, and one row from several seeds."""

from __future__ import annotations

import pytest

from edgetune.bench import fed


def test_rows_are_checked_and_fedit_always_runs(cli, tmp_path, capsys):
    assert fed.check(["fedkseed-recipe"]) == ["fedit (fo)", "fedkseed, ZO recipe (zo)"]
    assert fed.check(None) == list(fed.RUNS)  # every row, FedIT first
    out = ["--output", str(tmp_path / "B.md"), "--work", str(tmp_path / "w")]
    assert cli(["bench", "fed", "--rows", "fedkseed-recpie", *out]) == 2
    err = capsys.readouterr().err
    assert "bench fed: unknown row fedkseed-recpie; choose from fedit, fedit-ranks" in err
    assert not (tmp_path / "w").exists()  # refused before anything ran


def test_a_row_averages_its_seeds_and_reaches_the_target_only_if_every_seed_does():
    base = {"up_per_client_round": 100.0, "down_per_client_round": 300.0, "threads": 1}
    runs = [
        {**base, "start": 0.5, "final": 0.7, "best": 0.8, "bytes_to_target": 1000,
         "sim_s_to_target": 2.0, "round_to_target": 3},
        {**base, "start": 0.6, "final": 0.9, "best": 0.9, "bytes_to_target": None,
         "sim_s_to_target": None, "round_to_target": None},
    ]  # fmt: skip
    row = fed.combine(runs)
    assert (row["start"], row["final"], row["best"]) == pytest.approx((0.55, 0.8, 0.85))
    assert row["finals"] == [0.7, 0.9] and row["bytes_to_target"] is None
    both = fed.combine([runs[0], {**runs[0], "bytes_to_target": 3000, "round_to_target": 5}])
    assert (both["bytes_to_target"], both["round_to_target"]) == (2000, 4)
