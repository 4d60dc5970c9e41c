"""Per-task schema resolution: which columns, classes, verbalizer and template to use.

Precedence for every setting: the config (flags / YAML), then the built-in dataset's
spec, then inference from the columns (see `edgetune.data.normalize` for conventions).
A built-in's template and verbalizer are used only while its text fields and classes
are; the default template puts each field on its own line as "Name: value" and ends with
the cue "Answer:"; a literal backslash-n in a given template (as typed on a command line)
is a newline. `RESOLVERS` maps a task name to its resolver; each returns
`(rows, eval_rows or None, metadata for DataSplits)` with rows already normalised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgetune.data.config import DataConfig, template_fields
from edgetune.data.normalize import (
    ASSISTANT,
    HUMAN,
    LABEL_COLUMNS,
    PROMPT_COLUMNS,
    RESPONSE_COLUMNS,
    LabelMap,
    columns_of,
    infer_label_field,
    infer_text_fields,
    normalize_classification,
    normalize_instruction,
    normalize_lm,
    require_column,
)
from edgetune.data.source import Source
from edgetune.errors import ConfigError, DataError

Resolved = tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any]]


def default_template(text_fields: list[str]) -> str:
    """ "Name: {field}" per line, then the cue "Answer:"."""
    lines = [f"{name.replace('_', ' ').capitalize()}: {{{name}}}" for name in text_fields]
    return "\n".join([*lines, "Answer:"])


def infer_task(cfg: DataConfig, source: Source) -> str:
    """Guess the task of a user dataset from the config and its columns.

    Raises:
        ConfigError: the columns fit no task; the message asks for --task.
    """
    columns = columns_of(source.train)
    first = source.train[0] if source.train else {}
    text = first.get("text")
    if source.suffix == ".txt":
        return "lm"
    if cfg.label_field or cfg.labels or cfg.verbalizer or cfg.template:
        return "classification"
    if cfg.prompt_field or cfg.response_field:
        return "instruction"
    if any(c in columns for c in LABEL_COLUMNS):
        return "classification"
    if any(c in columns for c in PROMPT_COLUMNS) and any(c in columns for c in RESPONSE_COLUMNS):
        return "instruction"
    if isinstance(text, str) and HUMAN in text and ASSISTANT in text:
        return "instruction"
    if len(columns) == 1:
        return "lm"
    if "text" in columns:
        # Training a language model on "text" would ignore every other column; a column
        # such as "sentiment" is more likely a label under another name.
        others = [c for c in columns if c != "text"]
        raise ConfigError(
            f"cannot infer the task of {source.train_name}: besides 'text' it has the "
            f"columns {', '.join(others)}, which a language model would ignore. Pass "
            f"--task lm to train on 'text' alone, or --task classification --label-field "
            f"{others[0]} if that column holds the class"
        )
    raise ConfigError(
        f"cannot infer the task of {source.train_name} from its columns "
        f"({', '.join(columns)}); pass --task classification|instruction|lm"
    )


def _check_eval_columns(source: Source, names: list[str], flag: str) -> None:
    if source.eval is not None:
        for name in names:
            require_column(source.eval, name, source.eval_name or "the eval split", flag)


def _text_fields(cfg: DataConfig, source: Source, label_field: str) -> list[str]:
    spec, where = source.spec, source.train_name
    if cfg.text_fields:
        fields = list(cfg.text_fields)
    elif cfg.template:
        fields = list(dict.fromkeys(template_fields(cfg.template)))
    elif spec and spec.text_fields:
        fields = list(spec.text_fields)
    else:
        fields = infer_text_fields(source.train, {label_field}, where)
    for name in fields:
        require_column(source.train, name, where, "--text-fields")
    _check_eval_columns(source, fields, "--text-fields")
    return fields


def _template(cfg: DataConfig, source: Source, fields: list[str]) -> str:
    spec = source.spec
    if cfg.template:
        template = cfg.template.replace("\\n", "\n")  # a typed "\n" on the command line
    elif spec and spec.template and list(spec.text_fields) == fields:
        template = spec.template
    else:
        template = default_template(fields)
    unknown = [n for n in template_fields(template) if n not in fields]
    if unknown:
        raise ConfigError(
            f"data.template uses {', '.join(repr(n) for n in unknown)} but the text fields "
            f"are {', '.join(fields)}; use {{{fields[0]}}}-style placeholders or pass "
            f"--text-fields with those columns"
        )
    return template


def _classification(cfg: DataConfig, source: Source) -> Resolved:
    spec, where = source.spec, source.train_name
    label_field = cfg.label_field or (spec.label_field if spec else None)
    label_field = label_field or infer_label_field(source.train, where)
    require_column(source.train, label_field, where, "--label-field")
    _check_eval_columns(source, [label_field], "--label-field")
    fields = _text_fields(cfg, source, label_field)
    values = [r.get(label_field) for r in source.train + (source.eval or [])]
    given = cfg.labels or (list(spec.labels) if spec and spec.labels else None)
    labels = LabelMap([v for v in values if v is not None], given, spec.label_map if spec else {})
    if len(labels.labels) < 2:
        raise DataError(
            f"{where} has a single class ({', '.join(labels.labels)}) in column "
            f"{label_field!r}; classification needs at least two (check --label-field)"
        )
    verbalizer = cfg.verbalizer
    if verbalizer is None and spec and spec.verbalizer and labels.labels == list(spec.labels):
        verbalizer = list(spec.verbalizer)
    verbalizer = list(verbalizer or labels.labels)
    if len(verbalizer) != len(labels.labels):
        raise ConfigError(
            f"data.verbalizer has {len(verbalizer)} words but there are "
            f"{len(labels.labels)} classes ({', '.join(labels.labels)}); pass --verbalizer "
            f"with one word per class, in class order"
        )
    rows = normalize_classification(source.train, fields, label_field, labels, where)
    eval_rows = None
    if source.eval is not None:
        eval_where = source.eval_name or "the eval split"
        eval_rows = normalize_classification(source.eval, fields, label_field, labels, eval_where)
    meta = {
        "text_fields": fields,
        "label_field": label_field,
        "labels": labels.labels,
        "verbalizer": verbalizer,
        "template": _template(cfg, source, fields),
    }
    return rows, eval_rows, meta


def _pick(given: str | None, default: str | None, columns: list[str], names: tuple) -> str | None:
    return given or default or next((c for c in names if c in columns), None)


def _instruction(cfg: DataConfig, source: Source) -> Resolved:
    spec, where = source.spec, source.train_name
    columns = columns_of(source.train)
    prompt = _pick(cfg.prompt_field, spec.prompt_field if spec else None, columns, PROMPT_COLUMNS)
    response = _pick(
        cfg.response_field, spec.response_field if spec else None, columns, RESPONSE_COLUMNS
    )
    text_field = cfg.text_fields[0] if cfg.text_fields else "text"
    if prompt and response:
        require_column(source.train, prompt, where, "data.prompt_field=...")
        require_column(source.train, response, where, "data.response_field=...")
        _check_eval_columns(source, [prompt], "data.prompt_field=...")
        _check_eval_columns(source, [response], "data.response_field=...")
    elif cfg.prompt_field or cfg.response_field:
        raise ConfigError(
            "data.prompt_field and data.response_field go together; pass both "
            "(e.g. data.prompt_field=question data.response_field=answer)"
        )
    else:
        prompt = response = None
        flag = "data.prompt_field=... data.response_field=... (or --text-field)"
        require_column(source.train, text_field, where, flag)
        _check_eval_columns(source, [text_field], flag)
    rows = normalize_instruction(source.train, prompt, response, text_field, where)
    eval_rows = None
    if source.eval is not None:
        eval_where = source.eval_name or "the eval split"
        eval_rows = normalize_instruction(source.eval, prompt, response, text_field, eval_where)
    return rows, eval_rows, {"prompt_field": prompt, "response_field": response}


def _lm(cfg: DataConfig, source: Source) -> Resolved:
    spec, where = source.spec, source.train_name
    columns = columns_of(source.train)
    if cfg.text_fields:
        field = cfg.text_fields[0]
    elif spec and spec.text_fields:
        field = spec.text_fields[0]
    else:
        field = "text" if "text" in columns else infer_text_fields(source.train, set(), where)[0]
    require_column(source.train, field, where, "--text-field")
    _check_eval_columns(source, [field], "--text-field")
    rows = normalize_lm(source.train, field, where)
    eval_rows = None
    if source.eval is not None:
        eval_rows = normalize_lm(source.eval, field, source.eval_name or "the eval split")
    return rows, eval_rows, {"text_fields": [field]}


RESOLVERS: dict[str, Callable[[DataConfig, Source], Resolved]] = {
    "classification": _classification,
    "instruction": _instruction,
    "lm": _lm,
}
