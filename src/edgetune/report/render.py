"""`edgetune report DIR`: the report that fits the run, chosen by the command that
made it (summary.json's `command`; an unfinished run by its config)."""

from __future__ import annotations

from pathlib import Path

from edgetune.report import federated, single
from edgetune.report.run_info import load_run


def render(run_dir: str | Path) -> Path:
    """Write DIR/report.md and its plots; returns the report path.

    Raises:
        NotARunError: `run_dir` is not a run directory.
    """
    run = load_run(run_dir)
    return (federated.write if run.federated else single.write)(run)
