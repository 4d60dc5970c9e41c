"""Readers: a data file or a Hugging Face hub dataset -> a list of row dicts.

Formats are chosen by extension (an explicit dict, `READERS`):
- `.tsv`: header row, tab-separated, quoting disabled so the quotes inside SST-2
  sentences survive as text.
- `.csv`: header row, standard CSV quoting (AG News quotes fields containing commas).
- `.jsonl`: one JSON object per line; `.json`: a list of objects, or one object per line.
- `.txt`: the whole file as one row `{"text": ...}` (for language modelling).

Every value is kept as read (strings for tsv/csv); the task-specific checks and label
mapping happen in `edgetune.data.normalize`. Problems raise `DataError` naming the path
and the fix.

Text that is valid but unusual: a UTF-8 byte-order mark (what Excel and Notepad write
first) is dropped, so it does not become part of the first column's name or the first
line. A lone UTF-16 surrogate in JSON text (`"\\ud83d"`, half of an emoji cut in two) is
refused with its line rather than replaced: no UTF-8 tokenizer can encode it, and
replacing it would silently train on text the file does not hold.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from edgetune.errors import DataError

SEPARATORS = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
# "utf-8-sig" reads plain UTF-8 too, and drops a byte-order mark at the start.
ENCODING = "utf-8-sig"
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_separator(path: Path, header: list[str], delimiter: str) -> None:
    """Refuse a header that is one column only because the file uses another separator
    (a `;`-separated .csv or a comma-separated .tsv would otherwise load as one text
    column and silently train a language model on "a;b" lines)."""
    if len(header) != 1:
        return
    for other, name in SEPARATORS.items():
        if other != delimiter and other in header[0]:
            expected = SEPARATORS[delimiter]
            fix = {",": "name it .csv", "\t": "name it .tsv"}.get(
                other, f"re-save it {expected}-separated"
            )
            raise DataError(
                f"{path}: the header {header[0]!r} is separated by {name}s ({other!r}), but a "
                f"{path.suffix} file must be {expected}-separated; {fix} (or convert the file)"
            )


def _read_delimited(path: Path, delimiter: str, quoted: bool) -> list[dict[str, Any]]:
    # The default 128 KB cell limit is too small for user files holding whole documents.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with path.open(encoding=ENCODING, newline="") as f:
        quoting: Literal[0, 3] = csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        if reader.fieldnames is None:
            return []
        _check_separator(path, list(reader.fieldnames), delimiter)
        rows = []
        separator = "tab" if delimiter == "\t" else "comma"
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                header = reader.fieldnames
                raise DataError(
                    f"{path}: line {reader.line_num} does not have the {len(header)} "
                    f"{separator}-separated cells of the header ({', '.join(header)}); fix "
                    f"the line or check that the file is {separator}-separated"
                )
            rows.append(dict(row))
        return rows


def _read_tsv(path: Path) -> list[dict[str, Any]]:
    return _read_delimited(path, "\t", quoted=False)


def _read_csv(path: Path) -> list[dict[str, Any]]:
    return _read_delimited(path, ",", quoted=True)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding=ENCODING) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: line {number} is not valid JSON ({exc.msg}); each line must "
                    f'be one object such as {{"text": "..."}}'
                ) from None
            rows.append(_as_object(path, row, f"line {number}"))
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding=ENCODING)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)  # many ".json" files are really JSON Lines
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects, got {type(data).__name__}")
    return [_as_object(path, row, f"item {i}") for i, row in enumerate(data)]


def _as_object(path: Path, row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(
            f"{path}: {where} is a {type(row).__name__}, not an object; write one "
            f'{{"column": value, ...}} object per example'
        )
    for column, value in row.items():
        _refuse_lone_surrogate(path, where, column, value)
    return row


def _refuse_lone_surrogate(path: Path, where: str, column: str, value: Any) -> None:
    """Raise if `value` (a string, or lists and objects of them) holds half a UTF-16
    surrogate pair: JSON's `\\uXXXX` escapes can write one, UTF-8 cannot encode it."""
    if isinstance(value, dict):
        for inner in value.values():
            _refuse_lone_surrogate(path, where, column, inner)
    elif isinstance(value, list):
        for inner in value:
            _refuse_lone_surrogate(path, where, column, inner)
    elif isinstance(value, str) and (found := _SURROGATE.search(value)):
        escape = f"\\u{ord(found.group()):04x}"
        raise DataError(
            f"{path}: {where}, column {column!r}, holds the escape {escape} alone: half "
            f"of a UTF-16 surrogate pair (an emoji or rare character cut in two), which is "
            f"not text any tokenizer can encode. Delete it, or write the whole pair (e.g. "
            f"\\ud83d\\ude00), or re-export the file from its source as UTF-8"
        )


def _read_txt(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding=ENCODING)
    return [{"text": text}] if text.strip() else []


READERS: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
    ".tsv": _read_tsv,
    ".csv": _read_csv,
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".txt": _read_txt,
}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read a data file into row dicts.

    Args:
        path: a .tsv, .csv, .jsonl, .json or .txt file.

    Returns:
        One dict per example (column -> value); a .txt file gives one `{"text": ...}` row.

    Raises:
        DataError: the file is missing, unreadable, has an unknown extension, or no rows.
    """
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unknown data file extension {path.suffix or '(none)'!r}; use one of "
            f"{', '.join(READERS)} (rename the file or convert it)"
        )
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check the path passed to --dataset")
    try:
        rows = reader(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason}); re-save it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}); check its permissions") from None
    if not rows:
        raise DataError(
            f"{path} is empty (no rows); add examples (after the header line for tsv/csv)"
        )
    return rows


def read_hub(name: str, split: str, tried: list[str]) -> list[dict[str, Any]]:
    """Load one split of a Hugging Face hub dataset (needs internet).

    Args:
        name: `owner/name`, optionally `owner/name:config`.
        split: the split, e.g. "train" or "validation".
        tried: what was checked before the hub (built-in names, paths), for the error.

    Raises:
        DataError: the dataset cannot be loaded (offline, unknown id or split); the
            message lists everything that was tried.
    """
    repo, _, subset = name.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(repo, subset or None, split=split)
        rows = [dict(r) for r in ds]
    except Exception as exc:  # offline, unknown id, bad split: all become one message
        raise DataError(
            f"dataset {name!r} could not be loaded. Tried: {'; '.join(tried)}; "
            f"Hugging Face hub id {repo!r} (split {split!r}): {type(exc).__name__}: {exc}. "
            f"The hub is unreachable without internet: pass a built-in name or a local "
            f".tsv/.csv/.jsonl/.txt file instead"
        ) from None
    if not rows:
        raise DataError(f"hub dataset {name!r} split {split!r} has no rows; pick another split")
    return rows
