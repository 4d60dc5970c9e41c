"""Shared fixtures.

Tests that need `../shared/data` (real weights and datasets) use the `shared_data`
fixture: without it they skip with the reason, except under `CI=true`, where a missing
folder is a failure (CI must never silently skip the real-model tests).
"""

from __future__ import annotations

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
