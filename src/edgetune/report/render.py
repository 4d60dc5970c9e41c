"""`edgetune report DIR`: the report that fits the run, chosen by the command that
made it (summary.json's `command`; an unfinished run by its config)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgetune.report import compress, federated, single
from edgetune.report.run_info import REPORTED, RunRecord, load_run

REPORTS: dict[str, Callable[[RunRecord], Path]] = {
    "finetune": single.write,
    "eval": single.write,
    "federate": federated.write,
    "flower run": federated.write,
    "compress": compress.write,
}
assert set(REPORTS) == set(REPORTED), "every command load_run accepts has a report"


def render(run_dir: str | Path) -> Path:
    """Write DIR/report.md and its plots; returns the report path.

    Raises:
        NotARunError: `run_dir` is not a run directory.
    """
    run = load_run(run_dir)
    return REPORTS[run.command](run)
