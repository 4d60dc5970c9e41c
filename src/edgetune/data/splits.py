"""`load_splits`: resolve the dataset and task, normalise rows, split train / eval.

Splitting is a pure function of the rows and the seed: the training rows are shuffled
with `random.Random(seed)`; the first `eval_size` of that order are the evaluation rows
and the rest (capped at `train_size`) the training rows. Eval and train are therefore
disjoint by row (duplicate rows in the data are not merged), the eval rows do not depend
on `train_size`, and the same seed always gives the same splits. When an eval split is
used (`data.eval_split`, or a built-in's official split such as SST-2 `dev`), every
training row stays available for training and the eval split is used whole, or a seeded
sample of `eval_size` of its rows kept in file order.

For lm the unit of splitting is a document (see `edgetune.data.normalize`); the task's
`prepare_rows` packs documents into token blocks once the tokenizer is known.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

from edgetune.data.config import DataConfig
from edgetune.data.resolve import RESOLVERS, infer_task
from edgetune.data.source import load_source
from edgetune.errors import ConfigError, DataError
from edgetune.eval import BENCHMARKS


@dataclass
class DataSplits:
    """Normalised train and eval rows plus what is needed to build the task.

    Attributes:
        train: training rows in the task's row format (see `edgetune.data.normalize`).
        eval: evaluation rows, same format (empty when `eval_size` is 0).
        task: classification | instruction | lm.
        text_fields: classification text columns / the lm text column.
        label_field: classification label column.
        labels: class names in class-index order.
        verbalizer: one answer word per class.
        template: classification prompt template (always set for classification).
        prompt_field: instruction prompt column (None when split from one text column).
        response_field: instruction response column.
        source: where the rows came from, for logs and summaries.
    """

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    task: str
    text_fields: list[str] = field(default_factory=list)
    label_field: str | None = None
    labels: list[str] = field(default_factory=list)
    verbalizer: list[str] = field(default_factory=list)
    template: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    source: str = ""


def load_splits(cfg: DataConfig, seed: int) -> DataSplits:
    """Load `cfg.dataset`, normalise it for its task and split it deterministically.

    Args:
        cfg: the data settings.
        seed: the run seed; the same seed gives the same splits.

    Returns:
        The train and eval rows and the resolved task metadata.

    Raises:
        DataError: missing or malformed data, a missing column, an unknown label, or a
            split that would be empty.
        ConfigError: a config value that does not fit the data (verbalizer length,
            template placeholders, an uninferable task).
    """
    loaded = _load(cfg)
    train, evaluation = _split(loaded.rows, loaded.eval_rows, cfg, seed, loaded.where)
    return DataSplits(
        train=train, eval=evaluation, task=loaded.task, source=loaded.where, **loaded.meta
    )


def load_held_out(cfg: DataConfig, seed: int, eval_size: int, eval_seed: int) -> DataSplits:
    """The splits of a finished run (`cfg`, `seed`) with `eval_size` evaluation rows
    drawn with `eval_seed` among the rows that run never trained on.

    With the run's own eval_size and seed this is exactly the run's eval split; a smaller
    size takes its first rows; another seed or a larger size draws from the held-out rows
    plus any rows `train_size` left unused, never from the training rows. With an eval
    split, every row of it is held out.

    Raises:
        DataError: `eval_size` exceeds the rows the run held out (the message says how
            many there are).
    """
    loaded = _load(cfg)
    train, evaluation = _split(loaded.rows, loaded.eval_rows, cfg, seed, loaded.where)
    if loaded.eval_rows is not None:
        pool = list(loaded.eval_rows)
        if eval_seed == seed:
            chosen = {id(r) for r in evaluation}
            pool = evaluation + [r for r in pool if id(r) not in chosen]
    else:
        order = _order(len(loaded.rows), seed)
        trained = cfg.eval_size + len(train)
        pool = [loaded.rows[i] for i in order[: cfg.eval_size] + order[trained:]]
    if eval_seed != seed:
        random.Random(eval_seed).shuffle(pool)
    if eval_size > len(pool):
        raise DataError(
            f"--eval-size {eval_size}: the run trained on {len(train)} rows of "
            f"{loaded.where} and held out only {len(pool)}, so a larger evaluation would "
            f"score training rows; pass --eval-size {len(pool)} or less"
        )
    return DataSplits(
        train=train, eval=pool[:eval_size], task=loaded.task, source=loaded.where, **loaded.meta
    )


@dataclass
class _Loaded:
    rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]] | None
    task: str
    meta: dict[str, Any]
    where: str


def _load(cfg: DataConfig) -> _Loaded:
    if cfg.task in BENCHMARKS:
        raise ConfigError(
            f"data.task={cfg.task} is a benchmark with no training rows: only `edgetune "
            f"eval --task {cfg.task}` scores it; train on a dataset's task "
            f"(classification | instruction | lm) and evaluate the result with it"
        )
    source = load_source(cfg)
    task = cfg.task or (source.spec.task if source.spec else infer_task(cfg, source))
    rows, eval_rows, meta = RESOLVERS[task](cfg, source)
    if not rows:
        raise DataError(f"{source.train_name} has no usable rows for the {task} task; add data")
    return _Loaded(rows, eval_rows, task, meta, source.train_name)


def _order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def resolved_data(cfg: DataConfig, splits: DataSplits) -> DataConfig:
    """`cfg` with what `load_splits` resolved filled in (task, columns, labels,
    verbalizer, template), so a run's config.yaml says what was used and re-loading it
    gives the same rows and prompts."""
    return dataclasses.replace(
        cfg,
        task=splits.task,
        text_fields=list(splits.text_fields) or cfg.text_fields,
        label_field=splits.label_field or cfg.label_field,
        labels=list(splits.labels) or cfg.labels,
        verbalizer=list(splits.verbalizer) or cfg.verbalizer,
        template=splits.template or cfg.template,
        prompt_field=splits.prompt_field or cfg.prompt_field,
        response_field=splits.response_field or cfg.response_field,
    )


def _split(
    rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]] | None,
    cfg: DataConfig,
    seed: int,
    where: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    order = _order(len(rows), seed)
    if eval_rows is not None:
        if cfg.eval_size < len(eval_rows):
            keep = sorted(random.Random(seed).sample(range(len(eval_rows)), cfg.eval_size))
            eval_rows = [eval_rows[i] for i in keep]
        evaluation, train_order = eval_rows, order
    else:
        if cfg.eval_size >= len(rows):
            raise DataError(
                f"{where} has {len(rows)} rows, so eval_size={cfg.eval_size} leaves none for "
                f"training; lower data.eval_size (e.g. --eval-size {max(1, len(rows) // 5)}) "
                f"or add data"
            )
        evaluation = [rows[i] for i in order[: cfg.eval_size]]
        train_order = order[cfg.eval_size :]
    if cfg.train_size is not None:
        train_order = train_order[: cfg.train_size]
    return [rows[i] for i in train_order], evaluation
