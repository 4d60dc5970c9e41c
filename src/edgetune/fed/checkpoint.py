"""Federated checkpoints: the algorithm's server state after each completed round.

    DIR/state/algorithm.safetensors   FedAlgorithm.state_dict()
    DIR/state/round.json              {"round": R}

Written to a temporary folder and renamed, so a server killed mid-write keeps the last
complete round; resuming drops log lines of rounds after it.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from safetensors.torch import load_file, save_file

from edgetune.fed.algorithms.base import load_trainable
from edgetune.runs import RunDir


def save_round(run: RunDir, algo: Any, rnd: int) -> None:
    """Persist the server state after round `rnd`."""
    target = run.path / "state"
    tmp = run.path / "state.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {k: v.contiguous() for k, v in algo.state_dict().items()}, tmp / "algorithm.safetensors"
    )
    (tmp / "round.json").write_text(json.dumps({"round": rnd}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def load_round(run: RunDir, algo: Any, adapter: Any) -> int:
    """Restore the last completed round (0 if none) and trim later log lines."""
    target = run.path / "state"
    rnd = 0
    if (target / "round.json").exists():
        rnd = json.loads((target / "round.json").read_text())["round"]
        algo.load_state_dict(load_file(target / "algorithm.safetensors"))
        load_trainable(adapter, algo.state)
    for file in ("metrics.jsonl", "clients.jsonl", "timing.jsonl"):
        # round 0 is the pre-training evaluation; with no completed round, start afresh
        rows = [r for r in run.read_metrics(file) if rnd and r.get("round", 0) <= rnd]
        (run.path / file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rnd
