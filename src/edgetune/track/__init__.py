"""Experiment trackers: metrics.jsonl mirrored into TensorBoard, MLflow and/or W&B, offline.

`report_to=tensorboard,mlflow,wandb` (default `none`) on finetune, federate, `flower run`,
compress and ondevice. The trackers are a mirror of the run folder, never a second
source of truth: every numeric field of every metrics.jsonl line goes to each tracker at
that line's `step` (or `round`), and the resolved config goes in once as hyperparameters
(TensorBoard's HParams, MLflow params, dotted keys). Lines that carry a compress `stage`
instead of a step are logged as `stage/<field>` at the stage's ordinal (0 = before,
then the stages in the order they ran). Booleans and strings (including the "nan" that
metrics.jsonl writes for a non-finite value) are not numbers and are not mirrored.

Each tracker writes into its own folder of the run (RUN/tensorboard/, RUN/mlruns/,
RUN/wandb/: W&B's offline mode), no server and no network. On every start, including `--resume`, the folders are rebuilt from
metrics.jsonl as it stands (a resume first drops the lines after its checkpoint), so a
tracker always holds exactly the lines of metrics.jsonl, never the steps an interrupted
call logged and the resume redid.

The packages are optional (`pip install 'edgetune[track]'`) and imported only when a run
asks for them; `require` checks they are installed before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from edgetune.config import leaves, option
from edgetune.errors import ConfigError, EdgetuneError
from edgetune.track.mlflow import MlflowTracker
from edgetune.track.tensorboard import TensorBoardTracker
from edgetune.track.wandb import WandbTracker

EXTRA = "track"  # the pyproject extra that installs every tracker


class TrackerUnavailableError(EdgetuneError):
    """A tracker named in report_to needs a package that is not installed."""


class Tracker(Protocol):
    """One experiment tracker writing into its folder of the run."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Record the resolved config, flattened to dotted keys."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record the numeric fields of one metrics.jsonl line at `step`."""

    def close(self, status: str) -> None:
        """Flush and close; `status` is the run's summary status (done, diverged...)."""


@dataclasses.dataclass(frozen=True)
class TrackerSpec:
    """A tracker: its folder in the run, the module that must be importable, the pip
    package that provides it, and how to open it on a folder."""

    folder: str
    module: str
    package: str
    open: Callable[[Path], Tracker]


TRACKERS: dict[str, TrackerSpec] = {
    "tensorboard": TrackerSpec("tensorboard", "tensorboard", "tensorboard", TensorBoardTracker),
    "mlflow": TrackerSpec("mlruns", "mlflow", "mlflow-skinny", MlflowTracker),
    "wandb": TrackerSpec("wandb", "wandb", "wandb", WandbTracker),
}
FOLDERS = tuple(spec.folder for spec in TRACKERS.values())


def report_to_option() -> Any:
    """The `report_to` field every training command's config declares."""
    return option(
        "none",
        "experiment trackers that mirror metrics.jsonl and the resolved config, offline in "
        "the run folder: none | tensorboard (RUN/tensorboard/) | mlflow (RUN/mlruns/) | "
        "wandb (RUN/wandb/, offline), comma-separated for several; needs pip install "
        "'edgetune[track]'",
        flag="--report-to",
    )


def names(report_to: str) -> list[str]:
    """The tracker names in a `report_to` value (`none` = no tracker), in order.

    Raises:
        ConfigError: a name that is no tracker (with the closest one).
    """
    parts = [p.strip() for p in report_to.split(",") if p.strip()]
    if parts == ["none"]:
        return []
    for part in parts:
        if part not in (*TRACKERS, "none"):
            close = difflib.get_close_matches(part, list(TRACKERS), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"report_to: {part!r} is no tracker{hint}; give none, or one or more of "
                f"{', '.join(TRACKERS)} comma-separated (e.g. report_to=tensorboard,mlflow)"
            )
    if "none" in parts:
        raise ConfigError(
            f"report_to={report_to!r} names none beside a tracker; give the trackers "
            f"({' | '.join(TRACKERS)}, comma-separated) or none alone"
        )
    return list(dict.fromkeys(parts))


def require(report_to: str) -> None:
    """Check that every tracker in `report_to` can be imported (without importing it).

    Raises:
        TrackerUnavailableError: names the missing package and the extra that installs it.
    """
    for name in names(report_to):
        spec = TRACKERS[name]
        if importlib.util.find_spec(spec.module) is None:
            raise TrackerUnavailableError(
                f"report_to={name} needs the {spec.package} package, which is not installed; "
                f"install it with pip install 'edgetune[{EXTRA}]', or drop {name} from "
                "report_to"
            )


def numeric(row: dict[str, Any], skip: Iterable[str] = ()) -> dict[str, float]:
    """The numeric fields of a metrics line (booleans and non-finite values left out)."""
    left_out = set(skip)
    return {
        key: float(value)
        for key, value in row.items()
        if key not in left_out
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


class Mirror:
    """The trackers of one run, fed one metrics.jsonl line at a time."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers
        self.stages = 0  # compress stage lines seen, their ordinal

    def log(self, row: dict[str, Any]) -> None:
        """Mirror one metrics.jsonl line (as written: non-finite values already strings)."""
        if "stage" in row and "step" not in row:
            metrics = {f"stage/{k}": v for k, v in numeric(row).items()}
            step = self.stages
            self.stages += 1
        else:
            key = "step" if "step" in row else "round"
            step = int(row.get(key, 0))
            metrics = numeric(row, skip=("step", "round"))
        if metrics:
            for tracker in self.trackers:
                tracker.log_metrics(metrics, step)

    def close(self, status: str) -> None:
        """Close every tracker; the run ended with `status`."""
        for tracker in self.trackers:
            tracker.close(status)


def open_mirror(run: Path, report_to: str, config: dict[str, Any]) -> Mirror:
    """Rebuild the trackers of the run folder `run`: remove their folders (every tracker
    that has one, asked for or not, so none is left stale), open those in `report_to`
    and record the config. The caller replays metrics.jsonl into the result.

    Raises:
        TrackerUnavailableError: a tracker's package is missing.
    """
    require(report_to)
    for folder in FOLDERS:
        shutil.rmtree(run / folder, ignore_errors=True)
    trackers = [TRACKERS[name].open(run / TRACKERS[name].folder) for name in names(report_to)]
    params = {k: _param(v) for k, v in leaves(config).items()}
    for tracker in trackers:
        tracker.log_params(params)
    return Mirror(trackers)


def _param(value: Any) -> Any:
    """A config value as a tracker hyperparameter: numbers, strings and booleans kept,
    anything else (None, lists) as its text."""
    return value if isinstance(value, int | float | str | bool) else str(value)
