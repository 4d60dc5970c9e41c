"""FedSpine end to end on stories260K: the run-directory contract, arms and sub-models
in the logs, resume == uninterrupted (bandits included), and bad settings refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetune.cli import main
from edgetune.export.llama_cpp import llama_cpp_logits
from edgetune.models import load
from edgetune.runs import RunDir
from peft import PeftModel


def test_a_two_round_fedspine_run_satisfies_the_run_directory_contract(tmp_path, fedspine_args):
    out = tmp_path / "run"
    assert main(fedspine_args(out)) == 0
    run = RunDir(out, resume=True)
    rows = run.read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    # the sparsity ramps: round 0 is the full model, the last round is at the target
    assert rows[0]["sparsity"] == 0.0 and rows[-1]["sparsity"] == pytest.approx(0.5)
    assert rows[-1]["params"] < rows[0]["params"]
    assert all(0 <= r["eval/accuracy"] <= 1 for r in rows)
    clients = run.read_metrics("clients.jsonl")
    ok = [c for c in clients if c["status"] == "ok"]
    assert ok, "no client trained"
    for c in ok:  # each played an arm and reported its validation losses
        assert c["arm"] is not None and 0.0 <= c["ratio"] < 1.0
        assert c["val_before"] > 0 and c["val_after"] > 0
    # a round-2 device prunes at a level of the target (0.5, 1 or 1.5 x 0.5)
    assert {c["ratio"] for c in ok if c["round"] == 2} <= {0.25, 0.5, 0.75}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bytes_up"] == sum(r.get("bytes_up", 0) for r in rows)
    assert summary["classes"], "the summary names what each device class deploys"
    for deployed in summary["classes"].values():
        assert deployed["params"] < rows[0]["params"] and deployed["devices"] >= 1
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_fedspine_killed_in_round_3_and_resumed_ends_like_an_uninterrupted_run(
    tmp_path, fedspine_args, killed_in_round_3
):
    # Prepare: a 4-round reference, and the same run killed in round 3
    heads = "spine.units=mlp,heads"  # key/value head groups pruned too
    assert main(fedspine_args(tmp_path / "straight", heads, rounds=4)) == 0
    killed_in_round_3(fedspine_args(tmp_path / "killed", heads, rounds=4))
    # Execute
    assert main(["federate", "--resume", str(tmp_path / "killed")]) == 0
    # Assert: same adapter, metrics and arms (the ordering and the bandits were restored)
    a, b = tmp_path / "straight", tmp_path / "killed"
    adapter = Path("adapter") / "adapter_model.safetensors"
    assert (a / adapter).read_bytes() == (b / adapter).read_bytes()
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    arms = [
        [
            (c["round"], c["client"], c.get("arm"))
            for c in RunDir(p, resume=True).read_metrics("clients.jsonl")
        ]
        for p in (a, b)
    ]
    assert arms[0] == arms[1]
    assert len({arm for _, _, arm in arms[0]}) > 1, "the bandits played more than one arm"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target-sparsity", "0.9"], "leaves almost none"),
        (["spine.levels=0.5,-1"], "levels must be finite and >= 0"),
        (["spine.levels=0,0"], "no level above 0, so every arm prunes 0 %"),
        (["spine.ranks=2,64"], "outside [1, peft.rank"),
        (["spine.policy=uniform", "spine.levels=1,1.5"], "plays level 1 at the global rank"),
        (["spine.policy=random", "spine.discount=0.5"], "spine.policy=random plays no bandit"),
        (["spine.deadline_penalty=2"], "no round has a deadline"),
        (["fed.fleet=FLEET"], "no device of the fleet fits any FedSpine arm"),
    ],
)
def test_bad_fedspine_settings_exit_2_naming_the_fix(
    tmp_path, fedspine_args, capsys, extra, message
):
    fleet = tmp_path / "fleet.yaml"  # a device far too small for any sub-model
    fleet.write_text(
        "fleet:\n  - {name: dust, memory_mb: 0.01, gflops: 1, up_mbps: 1, down_mbps: 1}\n"
    )
    extra = [e.replace("FLEET", str(fleet)) for e in extra]
    assert main([*fedspine_args(tmp_path / "bad"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_spine_settings_are_refused_with_another_algorithm(tmp_path, fedspine_args, capsys):
    args = fedspine_args(tmp_path / "bad")
    args[args.index("fedspine")] = "fedit"
    assert main(args) == 2
    assert "read only by fed.algorithm=fedspine" in capsys.readouterr().err


def test_a_device_class_deploys_through_gguf_into_llama_cpp(tmp_path, fedspine_args):
    if os.environ.get("CI") != "true":  # CI installs it and must run this
        pytest.importorskip("llama_cpp")
    # Prepare: a FedSpine run and the deployable of its most pruned class
    out = tmp_path / "run"
    assert main(fedspine_args(out)) == 0
    classes = json.loads((out / "summary.json").read_text())["classes"]
    name = max(classes, key=lambda c: classes[c]["ratio"])
    folder = Path(classes[name]["folder"])
    # Execute: export it (the adapter merged) and run it in llama.cpp
    gguf = tmp_path / "gguf"
    args = ["export", "--model", str(folder / "model"), "--adapter", str(folder / "adapter")]
    assert main([*args, "--format", "gguf", "--merge", "--out", str(gguf), "--threads", "1"]) == 0
    model, tokenizer = load(str(folder / "model"))
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    logits = llama_cpp_logits(next(gguf.glob("*.gguf")), ids[0].tolist())
    # Assert: the pruned model is smaller, and llama.cpp computes what PEFT computes
    assert sum(p.numel() for p in model.parameters()) == classes[name]["params"]
    peft_model = PeftModel.from_pretrained(model, str(folder / "adapter")).eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits[0].numpy()
    assert np.abs(logits - expected).max() < 1e-4
