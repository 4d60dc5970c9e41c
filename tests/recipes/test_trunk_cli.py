"""The shared trunk from the command line on real stories260K runs: `finetune` records it
and resumes exactly, a cut above trainable tensors exits 2 naming them, and federated ZO
clients share it with the same result and less simulated time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TOP = "peft.layers=top:2"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method", ["zo", "prge", "fo"])
def test_a_shared_trunk_run_resumes_equal_to_an_uninterrupted_one(tmp_path, tiny_args, cli, method):
    # Prepare
    assert cli(tiny_args(tmp_path / "straight", TOP, method=method, steps=6)) == 0
    assert cli(tiny_args(tmp_path / "short", TOP, method=method, steps=4)) == 0
    # Execute
    assert cli(["finetune", "--resume", str(tmp_path / "short"), "--steps", "6"]) == 0
    # Assert: the trunk was shared (3 of stories260K's 5 blocks) and the resumed run is
    # the uninterrupted one, bit for bit
    summary = json.loads((tmp_path / "short" / "summary.json").read_text())
    assert summary["trunk_blocks"] == 3
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "short" / adapter).read_bytes() == (
        tmp_path / "straight" / adapter
    ).read_bytes()
    assert (tmp_path / "short" / "metrics.jsonl").read_bytes() == (
        tmp_path / "straight" / "metrics.jsonl"
    ).read_bytes()


def test_a_cut_above_trainable_tensors_exits_2_naming_them(tmp_path, tiny_args, cli, capsys):
    # Execute: LoRA on every block, the bottom 3 blocks asked to run without gradients
    code = cli(tiny_args(tmp_path / "run", "train.trunk=3"))
    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert "train.trunk=3" in err and "layers.0.self_attn" in err and "top:2" in err
    assert "Traceback" not in err


def test_federated_zo_clients_share_the_trunk_with_the_same_result(tmp_path, federate_args, cli):
    # Execute: FedKSeed's ZO clients at full depth and with the trunk shared
    runs = {}
    for trunk in ("off", "auto"):
        out = tmp_path / trunk
        args = federate_args(
            out, "--method", "zo", TOP, f"train.trunk={trunk}", algorithm="fedkseed"
        )
        assert cli(args) == 0
        runs[trunk] = out
    # Assert: the same evaluations, to fp32 rounding; less simulated work per client
    full, shared = (_jsonl(runs[t] / "metrics.jsonl") for t in ("off", "auto"))
    assert len(full) == len(shared) > 1
    for a, b in zip(full, shared, strict=True):
        assert a["eval/accuracy"] == b["eval/accuracy"]
        assert abs(a["eval/loss"] - b["eval/loss"]) < 1e-5
    seconds = {
        t: [c["sim_s"] for c in _jsonl(runs[t] / "clients.jsonl") if c["status"] == "ok"]
        for t in runs
    }
    assert seconds["off"] and all(
        s < f for s, f in zip(seconds["auto"], seconds["off"], strict=True)
    )
