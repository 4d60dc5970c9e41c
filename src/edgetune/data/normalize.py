"""Row normalisation: raw rows -> the task's row format, with the column conventions and
label mapping it relies on (which columns to use is decided in `resolve.py`).

Normalised rows, per task:
- classification: `{"fields": {name: str, ...}, "label": int}` (class index);
- instruction: `{"prompt": str, "response": str}`;
- lm: `{"text": str}` (one document; a single-row source such as a .txt file is cut
  into documents at blank lines, so it can be split into train and eval).

Column choices come from the config, else the built-in's spec, else conventions
("text"/"sentence"/"content", "label"/"labels", "prompt"/"response", ...). Label rules:
- string labels map through the class names (given, or the sorted unique values);
- integer labels (ints, or strings of digits as read from tsv/csv) map through the
  spec's label map (class names given in the config then rename its classes, in order); else, with class names given, values 0..n-1 index them; else the
  classes are the sorted unique integers, named by their decimal string.
Every problem raises `DataError` naming the row or column and the flag that fixes it.
Rows whose text is empty (every text field blank, or an instruction's prompt or
response blank) are dropped with a warning on stderr that says how many; a source with
no non-empty row is an error. An empty label is always an error (it is not a class).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

from edgetune.errors import ConfigError, DataError

TEXT_COLUMNS = ("text", "sentence", "content")
LABEL_COLUMNS = ("label", "labels")
PROMPT_COLUMNS = ("prompt", "instruction", "question", "input")
RESPONSE_COLUMNS = ("response", "output", "answer", "completion")
HUMAN, ASSISTANT = "### Human:", "### Assistant:"
_INT = re.compile(r"^[+-]?\d+$")


def split_dialogue(text: str, where: str) -> tuple[str, str]:
    """Split "### Human: X ### Assistant: Y" into (X, Y), both stripped.

    Raises:
        DataError: the markers are missing.
    """
    head, sep, response = text.partition(ASSISTANT)
    if not sep or HUMAN not in head:
        raise DataError(
            f"{where}: expected text of the form '{HUMAN} ... {ASSISTANT} ...'; for a file "
            f"with separate columns pass data.prompt_field=... data.response_field=..."
        )
    return head.split(HUMAN, 1)[1].strip(), response.strip()


def columns_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The column names of the first row (insertion order)."""
    return list(rows[0]) if rows else []


def require_column(rows: Sequence[dict[str, Any]], name: str, where: str, flag: str) -> None:
    """Raise DataError unless the first row has column `name` (lists the columns + flag)."""
    columns = columns_of(rows)
    if name not in columns:
        raise DataError(
            f"column {name!r} not found in {where}; columns are: {', '.join(columns)}. "
            f"Pass {flag} with one of them"
        )


def infer_label_field(rows: Sequence[dict[str, Any]], where: str) -> str:
    """The conventional label column ("label"/"labels"), or DataError asking for it."""
    columns = columns_of(rows)
    for name in LABEL_COLUMNS:
        if name in columns:
            return name
    raise DataError(
        f"no label column in {where}; columns are: {', '.join(columns)}. "
        f"Pass --label-field with the column that holds the class"
    )


def infer_text_fields(rows: Sequence[dict[str, Any]], exclude: set[str], where: str) -> list[str]:
    """The single string column besides `exclude`, else a conventional text column."""
    columns = columns_of(rows)
    candidates = [c for c in columns if c not in exclude and isinstance(rows[0][c], str)]
    if len(candidates) == 1:
        return candidates
    for name in TEXT_COLUMNS:
        if name in candidates:
            return [name]
    example = ",".join(candidates[:2]) or "COLUMN"
    raise DataError(
        f"cannot tell which column holds the text in {where}; columns are: "
        f"{', '.join(columns)}. Pass --text-fields (e.g. --text-fields {example})"
    )


def _cell(row: dict[str, Any], name: str, number: int, where: str, flag: str) -> Any:
    if name not in row or row[name] is None:
        raise DataError(
            f"row {number} of {where} has no value in column {name!r} (its columns: "
            f"{', '.join(row)}); fix the row or pass {flag} with another column"
        )
    return row[name]


def _text(row: dict[str, Any], name: str, number: int, where: str, flag: str) -> str:
    value = _cell(row, name, number, where, flag)
    if isinstance(value, dict | list):
        raise DataError(
            f"row {number} of {where}: column {name!r} holds a {type(value).__name__}, not a "
            f"string; write the text as a string or pass {flag} with a text column"
        )
    return str(value)


def _drop_empty(kept: list[dict], empty: list[int], total: int, where: str, what: str) -> None:
    """Warn that rows `empty` (1-based) were dropped; DataError when nothing is left."""
    if not empty:
        return
    if not kept:
        raise DataError(
            f"every row of {where} ({total}) has empty {what}; fill it in, or pick other "
            f"columns (--text-fields, data.prompt_field / data.response_field)"
        )
    shown = ", ".join(str(n) for n in empty[:5]) + (" ..." if len(empty) > 5 else "")
    print(
        f"edgetune: warning: dropped {len(empty)} of {total} rows of {where} with empty "
        f"{what} (rows {shown}); fill them in or delete them to silence this",
        file=sys.stderr,
    )


def is_int_label(value: Any) -> bool:
    """True for ints (not bools) and strings of digits."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and bool(_INT.match(value.strip())))


class LabelMap:
    """Maps raw label values to class indices, following the rules in the module docstring.

    The values are integer labels when most of them look like integers, so that one stray
    value is reported as a bad row rather than switching every row to string matching.
    """

    def __init__(
        self, values: Sequence[Any], given: Sequence[str] | None, label_map: dict[int, str]
    ):
        ints = {int(v) for v in values if is_int_label(v)}
        self.integer = 2 * sum(is_int_label(v) for v in values) > len(values)
        self.label_map = label_map if self.integer else {}
        self.map_names = list(self.label_map.values())
        self.by_position = False
        if self.integer and label_map:
            if given and len(given) != len(self.map_names):
                raise ConfigError(
                    f"data.labels has {len(given)} names but this dataset has "
                    f"{len(self.map_names)} classes ({', '.join(self.map_names)}); pass "
                    f"--labels with one name per class, in that order"
                )
            self.labels = list(given or self.map_names)
        elif self.integer and given:
            self.labels = list(given)
            self.by_position = ints <= set(range(len(given)))
        elif self.integer:
            self.labels = [str(i) for i in sorted(ints)]
        else:
            self.labels = list(given or sorted({str(v).strip() for v in values}))

    def index(self, value: Any) -> int | None:
        """The class index of `value`, or None when it is not a known class."""
        if not self.integer:
            name: str | None = str(value).strip()
        elif not is_int_label(value):
            return None
        elif self.by_position:
            return int(value) if 0 <= int(value) < len(self.labels) else None
        elif self.label_map:
            name = self.label_map.get(int(value))
            return self.map_names.index(name) if name is not None else None
        else:
            name = str(int(value))
        return self.labels.index(name) if name in self.labels else None


def normalize_classification(
    rows: Sequence[dict[str, Any]],
    text_fields: Sequence[str],
    label_field: str,
    labels: LabelMap,
    where: str,
) -> list[dict[str, Any]]:
    """Rows -> `{"fields": {...}, "label": class index}`.

    Raises:
        DataError: a row lacks a column, or its label is not one of the classes.
    """
    out, empty = [], []
    for number, row in enumerate(rows, start=1):
        raw = _cell(row, label_field, number, where, "--label-field")
        if not str(raw).strip():
            raise DataError(
                f"row {number} of {where} has an empty label in column {label_field!r}; "
                f"give it one of the classes or delete the row"
            )
        index = labels.index(raw)
        if index is None:
            raise DataError(
                f"row {number} of {where}: label {raw!r} is not one of the classes "
                f"({', '.join(labels.labels)}); fix the row, or pass --labels with every "
                f"class name"
            )
        fields = {name: _text(row, name, number, where, "--text-fields") for name in text_fields}
        if not any(v.strip() for v in fields.values()):
            empty.append(number)
            continue
        out.append({"fields": fields, "label": index})
    _drop_empty(out, empty, len(rows), where, f"text in {', '.join(text_fields)}")
    return out


def normalize_instruction(
    rows: Sequence[dict[str, Any]],
    prompt_field: str | None,
    response_field: str | None,
    text_field: str,
    where: str,
) -> list[dict[str, Any]]:
    """Rows -> `{"prompt", "response"}`, from two columns or one "### Human/Assistant" text."""
    out, empty = [], []
    for number, row in enumerate(rows, start=1):
        if prompt_field and response_field:
            prompt = _text(row, prompt_field, number, where, "data.prompt_field=...")
            response = _text(row, response_field, number, where, "data.response_field=...")
        else:
            text = _text(row, text_field, number, where, "--text-field")
            prompt, response = split_dialogue(text, f"row {number} of {where}")
        if not prompt.strip() or not response.strip():
            empty.append(number)
            continue
        out.append({"prompt": prompt, "response": response})
    _drop_empty(out, empty, len(rows), where, "prompt or response")
    return out


def normalize_lm(rows: Sequence[dict[str, Any]], text_field: str, where: str) -> list[dict]:
    """Rows -> `{"text"}` documents; a single row is cut into paragraphs at blank lines."""
    texts = [_text(row, text_field, n, where, "--text-field") for n, row in enumerate(rows, 1)]
    if len(texts) == 1:
        texts = re.split(r"\n\s*\n", texts[0])
        return [{"text": t.strip()} for t in texts if t.strip()]
    out = [{"text": t.strip()} for t in texts if t.strip()]
    empty = [n for n, t in enumerate(texts, 1) if not t.strip()]
    _drop_empty(out, empty, len(texts), where, f"text in {text_field!r}")
    return out
