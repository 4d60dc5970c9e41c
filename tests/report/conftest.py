"""Tiny real runs (stories260K on SST-2, seconds each) that the report tests read;
made once per session; a test that changes one copies it first."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgetune.cli import main

DATA = ["data.eval_size=16", "data.max_length=32"]


@pytest.fixture(scope="session")
def finetune_run(tmp_path_factory, stories260k_path, shared_data) -> Path:
    """A 4-step MeZO LoRA run evaluated at steps 0, 2 and 4."""
    del shared_data  # requested so a missing data folder skips with the reason
    out = tmp_path_factory.mktemp("runs") / "finetune"
    args = ["finetune", "--model", str(stories260k_path), "--dataset", "sst2", "--method", "zo"]
    args += ["--steps", "4", "--batch-size", "4", "--out", str(out), "data.train_size=64"]
    args += ["train.eval_every=2", "train.progress=false", *DATA]
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory, stories260k_path, shared_data) -> Path:
    """A zero-shot `edgetune eval --out` run: one evaluation line."""
    del shared_data
    out = tmp_path_factory.mktemp("runs") / "eval"
    args = ["eval", "--model", str(stories260k_path), "--dataset", "sst2", "--out", str(out)]
    assert main([*args, *DATA]) == 0
    return out


@pytest.fixture(scope="session")
def federate_run(tmp_path_factory, stories260k_path, shared_data) -> Path:
    """FedIT over 5 clients of the mixed fleet, 2 rounds (round 0 = zero-shot)."""
    del shared_data
    out = tmp_path_factory.mktemp("runs") / "federate"
    args = ["federate", "--model", str(stories260k_path), "--dataset", "sst2"]
    args += ["--algorithm", "fedit", "--method", "auto", "--fleet", "mixed", "--clients", "5"]
    args += ["--participation", "0.6", "--partition", "dirichlet:0.5", "--rounds", "2"]
    args += ["--local-steps", "3", "--batch-size", "4", "--out", str(out), "data.train_size=100"]
    assert main([*args, *DATA]) == 0
    return out


@pytest.fixture(scope="session")
def spine_run(tmp_path_factory, fedspine_args) -> Path:
    """FedSpine over 5 clients of the mixed fleet, 2 rounds, sparsity ramping to 0.5."""
    out = tmp_path_factory.mktemp("runs") / "fedspine"
    assert main(fedspine_args(out)) == 0
    return out


@pytest.fixture
def report():
    """`report(run_dir)`: render the run's report.md and return its text."""

    def render(run_dir: Path) -> str:
        assert main(["report", str(run_dir)]) == 0
        return (run_dir / "report.md").read_text()

    return render


@pytest.fixture
def md_table():
    """`md_table(text, header_start)`: the cells of the Markdown table whose header line
    starts with `header_start`."""

    def cells(text: str, header_start: str) -> list[list[str]]:
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
        rows = []
        for line in lines[start:]:
            if not line.startswith("|"):
                break
            rows.append([c.strip() for c in line.strip("|").split("|")])
        return rows

    return cells
