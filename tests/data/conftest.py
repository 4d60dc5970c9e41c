"""Fixtures for the data tests: the real stories260K tokenizer and model, tiny data files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tokenizer(stories260k_path: Path):
    """The stories260K tokenizer (512-token Llama BPE; it has no pad token)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories260k_path)


@pytest.fixture(scope="session")
def tiny_lm(stories260k_path: Path):
    """The pretrained stories260K causal LM, fp32, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories260k_path)
    return model.eval()


@pytest.fixture
def make_file(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write `text` to `tmp_path/name` and return the path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write
