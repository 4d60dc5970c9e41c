"""Standard zero-shot benchmarks `edgetune eval --task NAME` scores any loaded model on.

A benchmark reads its own file (a default on this machine, or `--dataset FILE` in the
same layout), draws `data.eval_size` of its items with `seed`, and returns its metrics.
Unlike a training task (`edgetune.data.tasks`) it has no training rows and no prompt
settings: it is scored exactly as the literature scores it, so its figures compare with
published ones. `BENCHMARKS` is the explicit registry name -> benchmark.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetune.eval import hellaswag


@dataclass(frozen=True)
class Benchmark:
    """A benchmark edgetune knows by name.

    Attributes:
        name: the `--task` value.
        description: one line for help and summaries.
        default_file: where its data is on this machine (raises DataError).
        load: (file, size, seed) -> the items scored (raises DataError on a bad file).
        score: (model, tokenizer, items, batch_size, on_batch) -> metrics (floats).
    """

    name: str
    description: str
    default_file: Callable[[], Path]
    load: Callable[[Path, int, int], Sequence[Any]]
    score: Callable[..., dict[str, float]]


BENCHMARKS: dict[str, Benchmark] = {
    "hellaswag": Benchmark(
        name="hellaswag",
        description="HellaSwag validation, acc and acc_norm as lm-evaluation-harness scores them",
        default_file=hellaswag.default_file,
        load=hellaswag.load,
        score=hellaswag.score,
    ),
}

__all__ = ["BENCHMARKS", "Benchmark"]
