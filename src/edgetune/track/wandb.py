"""Weights & Biases tracker: one offline run in RUN/wandb/ (project `edgetune`), nothing
sent; `wandb sync RUN/wandb/wandb/offline-run-*` uploads it later if the user wants.

Notable choices:
- Offline always (`mode="offline"`), and W&B's error reporting, console capture, git and
  system-stats sampling are off: a tracker that mirrors metrics.jsonl has no business
  with the network, the terminal or the repository.
- edgetune's x axis is its own field `step` (a round for a federation, a stage ordinal
  for compress stage lines), declared with `define_metric`: metrics.jsonl may go back in
  steps (a compress run's stage lines after its recovery steps; a divergence guard's
  rollback redoes steps), and W&B drops a `log(step=...)` below its last one, so W&B's
  own counter only numbers the lines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PROJECT = "edgetune"
STEP = "step"  # the x axis every metric is plotted against


class WandbTracker:
    """One offline W&B run under `folder`, named after the run folder."""

    def __init__(self, folder: Path):
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # no Sentry reports
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            console="off", disable_git=True, x_disable_stats=True, silent=True
        )
        self.run = wandb.init(
            mode="offline",
            dir=str(folder),
            project=PROJECT,
            name=folder.parent.name,
            settings=settings,
            reinit="create_new",  # a process may hold several runs (tests, a resume)
        )
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)

    def log_params(self, params: dict[str, Any]) -> None:
        """The config as the run's config (dotted keys)."""
        self.run.config.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One W&B history row: the metrics and edgetune's `step`."""
        self.run.log({**metrics, STEP: step})

    def close(self, status: str) -> None:
        """Finish the run: exit code 1 for a run that diverged, 0 otherwise."""
        self.run.finish(exit_code=1 if status == "diverged" else 0)
