"""MLflow tracker: one run in a local file store, RUN/mlruns/ (experiment `edgetune`),
through `MlflowClient`, so no server and no global MLflow state.

Notable choice: the file store. MLflow 3.7+ keeps it "in maintenance mode" and refuses it
unless MLFLOW_ALLOW_FILE_STORE=true, which this module sets for its own process when the
user has not set it. The alternative, a sqlite store, costs 6.5 s of schema migrations
per run on a 2-core machine (measured, MLflow 3.17.2) and needs SQLAlchemy and alembic;
a file store is plain folders. To open it: `MLFLOW_ALLOW_FILE_STORE=true mlflow ui
--backend-store-uri RUN/mlruns`, or `MlflowClient(tracking_uri=...)` with the same
variable set. MLflow's usage telemetry (network) is switched off the same way
(MLFLOW_DISABLE_TELEMETRY=true unless the user set it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

EXPERIMENT = "edgetune"
# MLflow's limits on one log_batch call
MAX_PARAMS = 100
MAX_METRICS = 1000


class MlflowTracker:
    """One MLflow run of the experiment `edgetune` in the file store `folder`; the run
    is named after the run folder."""

    def __init__(self, folder: Path):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # offline means offline: MLflow 3 sends usage telemetry unless told not to
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        # MLflow keeps one store per URI per process, and its store makes .trash only when
        # it is first built: a folder rebuilt in the same process (a resume) needs it back
        (folder / ".trash").mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=folder.resolve().as_uri())
        experiment = self.client.create_experiment(EXPERIMENT)
        self.run_id = self.client.create_run(experiment, run_name=folder.parent.name).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """The config as MLflow params (dotted keys, values as text)."""
        from mlflow.entities import Param

        items = [Param(key, str(value)) for key, value in params.items()]
        for i in range(0, len(items), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Each metric at `step` (timestamped now)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, value, now, step) for key, value in metrics.items()]
        for i in range(0, len(items), MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=items[i : i + MAX_METRICS])

    def close(self, status: str) -> None:
        """End the run: FAILED for a run that diverged, FINISHED otherwise (a federation
        stopped by its privacy budget finished what it may do)."""
        self.client.set_terminated(self.run_id, "FAILED" if status == "diverged" else "FINISHED")
