"""Fixtures for the pruning tests: stories260K (5 layers, 172 MLP channels, 4 KV heads of 2 query heads)."""

from __future__ import annotations

import pytest
import torch

from edgetune.models import load


@pytest.fixture
def stories(stories260k_path):
    """A fresh fp32 stories260K in eval mode (tests prune it in place)."""
    model, _ = load(str(stories260k_path))
    return model.eval()


@pytest.fixture
def calib_ids() -> torch.Tensor:
    """Two fixed calibration sequences of 24 tokens."""
    return torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
