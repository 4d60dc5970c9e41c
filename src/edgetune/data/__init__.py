"""Data: readers, built-in datasets, train/eval splits, tasks and federated partitions.

The training loop's path through this package:

    splits = load_splits(cfg.data, seed)             # normalised rows, task metadata
    task = build_task(splits, cfg.data, tokenizer)   # bound to the model's tokenizer
    train_rows = task.prepare_rows(splits.train)     # lm: token blocks; else unchanged
    eval_rows = task.prepare_rows(splits.eval)
    loss = task.example_losses(model, task.collate(batch_rows)).mean()
    metrics = task.evaluate(model, eval_rows, batch_size)   # keys without "eval/"

Federated runs split the training rows across clients with `partition`.
"""

from edgetune.data.builtin import BUILTIN_DATASETS, list_builtin_datasets
from edgetune.data.config import DataConfig
from edgetune.data.partition import partition
from edgetune.data.readers import read_rows
from edgetune.data.splits import DataSplits, load_splits
from edgetune.data.tasks import TASKS, Task, build_task

__all__ = [
    "BUILTIN_DATASETS",
    "TASKS",
    "DataConfig",
    "DataSplits",
    "Task",
    "build_task",
    "list_builtin_datasets",
    "load_splits",
    "partition",
    "read_rows",
]
