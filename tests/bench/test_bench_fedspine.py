"""`edgetune bench fedspine`: the rows' flags, how the columns and targets are computed,
and the whole benchmark through the CLI on stories260K in under a minute."""

from __future__ import annotations

import json

import pytest
import yaml

from edgetune.bench import fedspine as bench
from edgetune.cli import main


def _summary(**ratios: tuple[float, int]) -> dict:
    return {
        "classes": {c: {"ratio": r, "devices": n, "arm": "1x r8"} for c, (r, n) in ratios.items()}
    }


def _mean(final: float, to_target: float | None) -> dict:
    return {"final": final, "sim_s_to_target": to_target}


def test_every_row_shares_the_setting_and_uniform_pruning_takes_the_given_sparsity():
    rows = {r.name: r for r in bench.ROWS}
    args = {
        name: bench.federate_args(row, "m", 12, seed=1, sparsity=0.27) for name, row in rows.items()
    }
    for a in args.values():
        assert a[a.index("--seed") + 1] == "1" and a[a.index("--rounds") + 1] == "12"
        assert a[a.index("--fleet") + 1] == "mixed" and a[a.index("--clients") + 1] == "10"
        assert a[a.index("--threads") + 1] == "1" and a[a.index("--lr") + 1] == "5e-4"
        assert "data.eval_size=100" in a and not any(x.startswith("data.train_size") for x in a)
    uniform = args["uniform"]
    assert "spine.policy=uniform" in uniform
    assert uniform[uniform.index("--target-sparsity") + 1] == "0.2700"
    assert args["fedspine"][args["fedspine"].index("--target-sparsity") + 1] == str(
        bench.TARGET_SPARSITY
    )
    assert "spine.policy=random" in args["random"] and "fed.ranks=device" in args["hetlora"]
    assert args["fedit"][args["fedit"].index("--algorithm") + 1] == "fedit"
    small = bench.federate_args(rows["fedit"], "m", 2, seed=0, eval_size=8, train_size=50)
    assert "data.eval_size=8" in small and "data.train_size=50" in small


def test_average_sparsity_weighs_each_class_by_its_devices():
    summary = _summary(phone=(0.45, 4), agx=(0.15, 2))
    assert bench.average_sparsity(summary) == pytest.approx((0.45 * 4 + 0.15 * 2) / 6)
    assert bench.average_sparsity({"bytes_up": 1}) == 0.0  # FedIT: no classes
    assert bench.deployed_speed({"bytes_up": 1}, {}) is None  # FedIT: the unpruned model
    summary["classes"]["phone"]["folder"] = "p"
    summary["classes"]["agx"]["folder"] = "a"
    assert bench.deployed_speed(summary, {"p": 10.0, "a": 40.0}) == pytest.approx(20.0)


def test_targets_pass_or_miss_with_the_measured_ratio():
    mean = {
        "fedspine": _mean(0.80, 10.0),
        "uniform": _mean(0.78, 15.0),
        "random": _mean(0.81, 12.0),
    }
    speed, accuracy, bandit = bench.targets(mean)
    assert "PASS: 1.50x" in speed and accuracy.startswith("- FedSpine ends") and "PASS" in accuracy
    assert "PASS" in bandit  # less accurate than random arms, but sooner to the target
    mean["uniform"] = _mean(0.85, 12.0)
    mean["random"] = _mean(0.81, None)
    speed, accuracy, bandit = bench.targets(mean)
    assert "MISS: 1.20x" in speed and "MISS (0.800 against 0.850)" in accuracy
    assert "PASS" in bandit  # random arms never reached the target
    mean["fedspine"] = _mean(0.70, None)
    speed, _, bandit = bench.targets(mean)
    assert speed.endswith("MISS: FedSpine did not reach the target accuracy in every seed")
    assert "MISS" in bandit


def test_bench_fedspine_refuses_flags_it_does_not_read(capsys):
    assert main(["bench", "fedspine", "--clients", "4"]) == 2
    assert "bench fedspine does not use --clients; drop it" in capsys.readouterr().err


def test_the_whole_bench_on_stories260k_writes_a_section_with_five_rows(tmp_path, stories260k_path):
    output = tmp_path / "docs" / "BENCHMARKS.md"
    output.parent.mkdir()
    output.write_text("# Benchmarks\n\n<!-- bench:fed -->\nkept\n<!-- /bench:fed -->\n")
    args = ["bench", "fedspine", "--model", str(stories260k_path), "--rounds", "2"]
    args += ["--seeds", "0", "--output", str(output), "--work", str(tmp_path / "runs")]
    args += ["--eval-size", "20", "--train-size", "200", "--threads", "1"]

    assert main(args) == 0

    text = output.read_text()
    assert "kept" in text and text.count("## FedSpine") == 1
    section = text.split("<!-- bench:fedspine -->")[1]
    assert "--eval-size 20 --train-size 200" in section and "Threads: 1 in each" in section
    for row in bench.ROWS:  # in the mean table and the per-seed table, with numbers
        lines = [ln for ln in section.splitlines() if f"| {row.label} |" in ln]
        assert len(lines) == 2, row.label
        cells = [c.strip() for c in lines[0].strip("|").split("|")]
        assert 0.0 <= float(cells[1]) <= 1.0  # final accuracy
        assert int(cells[3].replace(",", "")) > 0  # bytes up + down
        sparsity = float(cells[4])
        assert (sparsity > 0) == (row.name in ("fedspine", "random", "uniform")), row.label
    runs = tmp_path / "runs" / "0"
    spine = json.loads((runs / "fedspine" / "summary.json").read_text())
    uniform = yaml.safe_load((runs / "uniform" / "config.yaml").read_text())["spine"]
    assert uniform["policy"] == "uniform"  # at row 2's average deployed sparsity
    assert uniform["target_sparsity"] == pytest.approx(bench.average_sparsity(spine), abs=1e-4)
    assert section.count("PASS") + section.count("MISS") == 3
    assert (tmp_path / "docs" / "bench_fedspine.png").stat().st_size > 1000
