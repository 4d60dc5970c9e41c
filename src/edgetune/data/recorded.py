"""The task an adapter was trained on, as its run recorded it.

A finetune or federate run writes its resolved `data` section into RUN/config.yaml
(dataset, task, columns, labels, verbalizer, template), beside RUN/adapter. A command
that scores the adapter without replaying the run (`edgetune compress --adapter`) takes
the task from there: with other labels, verbalizer or template, the same adapter scores
as something it was not trained to do. `edgetune eval` finds the run the same way
(`run_of_adapter`) and replays all of it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edgetune.config import build
from edgetune.data.config import DataConfig
from edgetune.errors import ConfigError
from edgetune.runs import RunDir

# What defines the task (the rows, how they are prompted and which answers are scored);
# the sizes of the evaluation and of the examples stay the scoring command's own.
TASK_FIELDS = (
    "dataset",
    "task",
    "text_fields",
    "label_field",
    "labels",
    "verbalizer",
    "template",
    "prompt_field",
    "response_field",
)


def run_of_adapter(adapter: str | Path) -> Path | None:
    """The run directory holding adapter folder `adapter` (RUN/adapter with a
    RUN/config.yaml), or None for an adapter folder outside a run."""
    parent = Path(adapter).parent
    return parent if (parent / "config.yaml").is_file() else None


def recorded_data(run: Path) -> DataConfig | None:
    """The `data` section RUN/config.yaml recorded (None if it has none)."""
    tree = RunDir(run, resume=True).read_config()
    data = tree.get("data")
    return build(DataConfig, data, "data.") if isinstance(data, dict) else None


def with_recorded_task(given: DataConfig, adapter: str | Path) -> DataConfig:
    """`given` with the task of the run that trained `adapter` in every task setting left
    at its default; `given` itself for an adapter outside a run.

    Raises:
        ConfigError: a task setting given differs from the run's (names it, the run's
            value and the fix).
    """
    run = run_of_adapter(adapter)
    recorded = recorded_data(run) if run is not None else None
    if recorded is None:
        return given
    default, taken = DataConfig(), {}
    for name in TASK_FIELDS:
        mine, theirs = getattr(given, name), getattr(recorded, name)
        if mine == getattr(default, name):
            taken[name] = theirs
        elif theirs is not None and mine != theirs:
            raise ConfigError(
                f"data.{name}={mine!r} contradicts the task adapter {adapter} was trained "
                f"on ({run / 'config.yaml'} records data.{name}={theirs!r}); drop it to "
                "score the adapter on its own task, or pass an adapter trained with it"
            )
    return dataclasses.replace(given, **taken)
