"""TensorBoard tracker: scalars and HParams in RUN/tensorboard/, through torch's
`SummaryWriter` (which needs the `tensorboard` package).

The config goes in as one HParams session (the HPARAMS tab); every metric is a scalar
under its metrics.jsonl name (`loss`, `eval/accuracy`, `bytes_up`...). The writer is
flushed after each line, so a run that is killed keeps every line it logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TensorBoardTracker:
    """Writes one event file in `folder`."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def log_params(self, params: dict[str, Any]) -> None:
        """The config as an HParams session (no metric is declared: the scalars are)."""
        from torch.utils.tensorboard.summary import hparams

        events = self.writer.file_writer  # made by SummaryWriter.__init__, None once closed
        assert events is not None, "log_params after close"
        for summary in hparams(params, {}):
            events.add_summary(summary)
        self.writer.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One scalar per metric at `step`."""
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self, status: str) -> None:
        """Flush and close the event file (TensorBoard has no run status)."""
        del status
        self.writer.close()
