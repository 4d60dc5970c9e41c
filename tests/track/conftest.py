"""The finetune arguments of the tracker tests (as tests/recipes' `tiny_args`)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def tiny_args(stories260k_path, shared_data):
    """Arguments for a seconds-long real fine-tune: stories260K on 64 SST-2 sentences,
    evaluated and checkpointed every 2 steps."""
    del shared_data

    def make(out: Path, *extra: str, steps: int = 4) -> list[str]:
        return [
            "finetune",
            "--model",
            str(stories260k_path),
            "--dataset",
            "sst2",
            "--method",
            "zo",
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
