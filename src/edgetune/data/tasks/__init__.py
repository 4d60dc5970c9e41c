"""Tasks: classification (prompt + verbalizer), instruction (SFT), lm (packed blocks).

`TASKS` is the explicit registry task name -> builder; `build_task` binds the task that
`load_splits` resolved to a tokenizer. Every task follows the `Task` Protocol in `base.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgetune.data.config import DataConfig
from edgetune.data.splits import DataSplits
from edgetune.data.tasks.base import Task
from edgetune.data.tasks.classification import ClassificationTask
from edgetune.data.tasks.instruction import InstructionTask
from edgetune.data.tasks.lm import LMTask
from edgetune.errors import ConfigError

TASKS: dict[str, Callable[[DataSplits, DataConfig, Any], Task]] = {
    "classification": ClassificationTask.from_splits,
    "instruction": InstructionTask.from_splits,
    "lm": LMTask.from_splits,
}


def build_task(splits: DataSplits, cfg: DataConfig, tokenizer: Any) -> Task:
    """The task for `splits.task`, bound to `tokenizer` and the config's lengths.

    Args:
        splits: the output of `load_splits` (task name and resolved metadata).
        cfg: the data settings (max_length, max_new_tokens).
        tokenizer: the model's Hugging Face tokenizer; it is not modified (a missing pad
            token is replaced by eos/unk internally).

    Raises:
        ConfigError: an unknown task, colliding verbalizer tokens, or a max_length too
            short for the prompt frame or beyond the tokenizer's `model_max_length`.
    """
    builder = TASKS.get(splits.task)
    if builder is None:
        raise ConfigError(f"unknown task {splits.task!r}; valid tasks: {', '.join(TASKS)}")
    context = tokenizer.model_max_length  # the model's positions (see `models.load`)
    if cfg.max_length > context:
        raise ConfigError(
            f"data.max_length={cfg.max_length} is beyond the model's context of {context} "
            f"tokens; pass --max-length {context} or less"
        )
    return builder(splits, cfg, tokenizer)


__all__ = ["TASKS", "ClassificationTask", "InstructionTask", "LMTask", "Task", "build_task"]
