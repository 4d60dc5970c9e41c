"""Where a dataset's rows come from: a built-in name, a local file, or a hub id.

`data.dataset` is resolved in that order: a built-in name (`BUILTIN_DATASETS`), then an
existing path or anything with a data-file extension, then `owner/name[:config]` on the
Hugging Face hub. `data.eval_split` is a split name of the built-in (or of the hub
dataset) or a file path. Unresolvable names raise `DataError` listing all that was tried.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetune.data.builtin import BUILTIN_DATASETS, BuiltinDataset
from edgetune.data.config import DataConfig
from edgetune.data.readers import READERS, read_hub, read_rows
from edgetune.errors import DataError

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")


@dataclass
class Source:
    """Raw rows of a dataset, before normalisation."""

    train: list[dict[str, Any]]
    train_name: str  # for messages, e.g. "data/train.tsv" or "sst2 (split train)"
    eval: list[dict[str, Any]] | None = None  # the eval split, if one is used
    eval_name: str | None = None
    spec: BuiltinDataset | None = None
    suffix: str = ""  # file extension of a local file ("" otherwise)


def load_source(cfg: DataConfig) -> Source:
    """Read the rows `cfg.dataset` (and `cfg.eval_split`) resolve to.

    Raises:
        DataError: nothing matches, or the data is missing or malformed.
    """
    name = cfg.dataset
    if name in BUILTIN_DATASETS:
        return _builtin_source(BUILTIN_DATASETS[name], cfg.eval_split)
    path = Path(name).expanduser()
    if path.is_dir():
        raise DataError(f"--dataset {name} is a folder; pass a data file inside it")
    if path.exists() or path.suffix.lower() in READERS:
        source = Source(read_rows(path), str(path), suffix=path.suffix.lower())
        if cfg.eval_split:
            source.eval, source.eval_name = _eval_file(cfg.eval_split, []), cfg.eval_split
        return source
    tried = [f"built-in names ({', '.join(BUILTIN_DATASETS)})", f"file {path.resolve()}"]
    if not _HUB_ID.match(name):
        raise DataError(
            f"unknown dataset {name!r}. Tried: {'; '.join(tried)}; it is not a hub id "
            f"(owner/name) either. Pass a built-in name, an existing "
            f"{'/'.join(READERS)} file, or owner/name"
        )
    source = Source(read_hub(name, "train", tried), f"{name} (split train)")
    if cfg.eval_split:
        split = cfg.eval_split
        eval_path = Path(split).expanduser()
        source.eval = read_rows(eval_path) if eval_path.exists() else read_hub(name, split, tried)
        source.eval_name = split
    return source


def _builtin_source(spec: BuiltinDataset, eval_split: str | None) -> Source:
    train_split = spec.splits[0]
    source = Source(spec.load(train_split), f"{spec.name} (split {train_split})", spec=spec)
    split = eval_split or spec.eval_split
    if split is None:
        return source
    if split in spec.splits:
        source.eval, source.eval_name = spec.load(split), f"{spec.name} (split {split})"
    else:
        source.eval, source.eval_name = _eval_file(split, list(spec.splits)), split
    return source


def _eval_file(split: str, split_names: list[str]) -> list[dict[str, Any]]:
    path = Path(split).expanduser()
    if path.is_file():
        return read_rows(path)
    names = f"a split name ({', '.join(split_names)}) or " if split_names else ""
    raise DataError(
        f"data.eval_split {split!r} is neither a split of this dataset nor an existing file "
        f"(checked {path.resolve()}); pass {names}a data file"
    )
