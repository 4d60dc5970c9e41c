"""Helpers for the end-to-end CLI tests on stories260K + SST-2 (tiny, seconds each)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def tiny_args(stories260k_path, shared_data):
    """Arguments for a seconds-long real fine-tune: stories260K on 64 SST-2 sentences."""
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
