"""Shared fixtures.

Tests that need `../shared/data` (real weights and datasets) use the `shared_data`
fixture: without it they skip with the reason, except under `CI=true`, where a missing
folder is a failure (CI must never silently skip the real-model tests).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgetune.paths import shared_data_candidates, shared_data_dir


def _require(path: Path | None, what: str) -> Path:
    if path is not None and path.exists():
        return path
    tried = ", ".join(str(p) for p in shared_data_candidates())
    msg = f"{what} not found (looked in {tried}); set EDGETUNE_DATA to the shared data folder"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (`../shared/data`)."""
    return _require(shared_data_dir(), "shared data folder")


@pytest.fixture(scope="session")
def stories260k_path(shared_data: Path) -> Path:
    """The stories260K Hugging Face folder."""
    return _require(shared_data / "models" / "stories260K", "stories260K model")


@pytest.fixture(scope="session")
def onnx_lora_export(tmp_path_factory, stories260k_path) -> Path:
    """stories260K exported to ONNX with rank-4 LoRA inputs on q_proj and v_proj and every
    position's logits (made once: an export takes about half a minute)."""
    from edgetune.cli import main

    out = tmp_path_factory.mktemp("onnx-lora") / "export"
    flags = ["--format", "onnx", "--lora-rank", "4", "lora_targets=[q_proj,v_proj]"]
    args = ["export", "--model", str(stories260k_path), "--out", str(out), "--threads", "1"]
    assert main([*args, *flags]) == 0
    return out


@pytest.fixture(scope="session")
def federate_args(stories260k_path, shared_data):
    """`make(out, *extra, algorithm, rounds, fleet)`: the arguments of a seconds-long
    `edgetune federate` of 5 stories260K clients on 100 SST-2 sentences."""
    del shared_data

    def make(out, *extra, algorithm="fedit", rounds=2, fleet="jetsons"):
        return [
            "federate",
            "--model",
            str(stories260k_path),
            "--dataset",
            "sst2",
            "--algorithm",
            algorithm,
            "--clients",
            "5",
            "--participation",
            "0.6",
            "--fleet",
            fleet,
            "--rounds",
            str(rounds),
            "--local-steps",
            "3",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "data.train_size=100",
            "data.eval_size=16",
            "data.max_length=32",
            *extra,
        ]

    return make


@pytest.fixture(scope="session")
def fedspine_args(federate_args):
    """`make(out, *extra, rounds)`: `federate_args` for FedSpine on the mixed fleet, the
    sparsity ramping to 0.5 over the first half of the rounds, statistics every round."""

    def make(out, *extra, rounds=2):
        spine = ["--target-sparsity", "0.5", "spine.ramp=0.5", "spine.reorder_every=1"]
        return federate_args(
            out, *spine, *extra, algorithm="fedspine", rounds=rounds, fleet="mixed"
        )

    return make


@pytest.fixture
def cli():
    """Run the CLI in-process; returns the exit status."""
    from edgetune.cli import main

    return main


class _Killed(Exception):
    """Stands for the process dying (a crash, a kill, a full disk)."""


@pytest.fixture
def run_torn(monkeypatch):
    """`run_torn(argv, file, key, at)`: run the CLI in-process and kill it half-way
    through appending the `file` line whose `key` is `at`, leaving half that line at the
    end of the file; asserts that it died there."""
    from edgetune.cli import main
    from edgetune.runs import RunDir

    original = RunDir.log

    def run(argv: list[str], target: str, key: str, at: int) -> None:
        def log_torn(self, record, file="metrics.jsonl"):
            if file == target and record.get(key) == at:
                line = json.dumps(record)
                with open(self.path / file, "a") as fh:
                    fh.write(line[: len(line) // 2])
                raise _Killed
            original(self, record, file)

        with monkeypatch.context() as patch:
            patch.setattr(RunDir, "log", log_torn)
            with pytest.raises(_Killed):
                main(argv)

    return run


@pytest.fixture
def tiny_args(stories260k_path, shared_data):
    """Arguments for a seconds-long real fine-tune: stories260K on 64 SST-2 sentences,
    evaluated and checkpointed every 2 steps (the recipe and tracker tests)."""
    del shared_data

    def make(out: Path, *extra: str, method: str = "zo", steps: int = 4) -> list[str]:
        return [
            "finetune",
            "--model",
            str(stories260k_path),
            "--dataset",
            "sst2",
            "--method",
            method,
            "--steps",
            str(steps),
            "--batch-size",
            "4",
            "--out",
            str(out),
            "data.train_size=64",
            "data.eval_size=16",
            "data.max_length=32",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "train.progress=false",
            *extra,
        ]

    return make
