"""`DataConfig`: which dataset, which task, and how examples are shaped.

Plain types only (str, int, lists of str), because the top-level loader fills it from
YAML and `--flag`/`key=value` overrides. Everything left as None is resolved later by
`load_splits` from the built-in dataset's defaults or inferred from the data's columns;
this class only checks what can be checked without reading data.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from edgetune.config import option
from edgetune.data.builtin import BUILTIN_DATASETS
from edgetune.errors import ConfigError
from edgetune.eval import BENCHMARKS

TASK_NAMES = ("classification", "instruction", "lm")
# `edgetune eval --task NAME` also takes a standard benchmark (`edgetune.eval`)
TASK_CHOICES = (*TASK_NAMES, *BENCHMARKS)


@dataclass
class DataConfig:
    """Dataset and task settings.

    Attributes:
        dataset: a built-in name (`edgetune datasets`), a .tsv/.csv/.jsonl/.json/.txt
            file, or a Hugging Face datasets id `owner/name` (needs internet).
        task: classification | instruction | lm; None = the built-in's default, else
            inferred from the columns. `edgetune eval` also scores a benchmark
            (hellaswag): then `dataset` is its file if given, and `eval_size` and `seed`
            draw the sample.
        text_fields: classification text columns (one or two), or the lm text column.
        label_field: classification label column.
        labels: class names in class-index order.
        verbalizer: one answer word per class, predicted after the prompt's cue.
        template: classification prompt with `{field}` placeholders named after the text
            fields, ending with the answer cue, e.g. "Review: {sentence}\\nSentiment:".
        prompt_field: instruction prompt column.
        response_field: instruction response column.
        max_length: tokens per example (classification prompt, instruction prompt +
            response, or lm block).
        eval_size: held-out evaluation examples (0 = no evaluation); with an eval split,
            a cap on its size.
        train_size: cap on training examples (None = all that remain); for the lm task a
            cap on documents, which are then packed into blocks of max_length tokens, so
            64 documents can give more (or fewer) than 64 training examples.
        max_new_tokens: tokens generated per instruction example for ROUGE-L.
        eval_split: a file, or a built-in / hub split name, evaluated on instead of a
            held-out slice of the training data.
    """

    dataset: str = option(
        "bbc-news",
        "built-in name, data file (.tsv/.csv/.jsonl/.txt) or hub id",
        path=BUILTIN_DATASETS,
        flag="--dataset",
    )
    task: str | None = option(
        None,
        "classification | instruction | lm, or for eval hellaswag (default: inferred)",
        flag="--task",
    )
    text_fields: list[str] | None = option(
        None, "text column(s), e.g. title,description", flag=("--text-fields", "--text-field")
    )
    label_field: str | None = option(None, "classification label column", flag="--label-field")
    labels: list[str] | None = option(None, "class names in class-index order", flag="--labels")
    verbalizer: list[str] | None = option(None, "one answer word per class", flag="--verbalizer")
    template: str | None = option(
        None, "classification prompt with {field} placeholders", flag="--template"
    )
    prompt_field: str | None = option(None, "instruction prompt column")
    response_field: str | None = option(None, "instruction response column")
    max_length: int = option(128, "tokens per example", flag="--max-length")
    eval_size: int = option(200, "held-out evaluation examples (0 = none)", flag="--eval-size")
    train_size: int | None = option(
        None,
        "cap on training examples; for --task lm a cap on documents, which are packed into "
        "blocks of max_length tokens (64 documents can give more than 64 training examples)",
        flag="--train-size",
    )
    max_new_tokens: int = option(32, "generated tokens per instruction eval example")
    eval_split: str | None = option(None, "file or split name to evaluate on instead", path=())

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise ConfigError("data.dataset: expected a built-in name, a file path or a hub id")
        if self.task is not None and self.task not in TASK_CHOICES:
            raise ConfigError(
                f"data.task: {self.task!r} is not one of {', '.join(TASK_CHOICES)}; "
                f"pass --task classification|instruction|lm (edgetune eval also takes "
                f"{'|'.join(BENCHMARKS)}) or leave it unset to infer it"
            )
        _check_int("max_length", self.max_length, minimum=4)
        _check_int("eval_size", self.eval_size, minimum=0)
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        if self.train_size is not None:
            _check_int("train_size", self.train_size, minimum=1)
        for name in ("text_fields", "labels", "verbalizer"):
            _check_str_list(name, getattr(self, name))
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"data.labels: class names must be unique, got {self.labels}")
        if self.template is not None:
            _check_template(self.template)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"data.{name}: expected an integer >= {minimum}, got {value!r}")


def _check_str_list(name: str, value: object) -> None:
    if value is None:
        return
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, str) and v.strip() for v in value)
    ):
        raise ConfigError(
            f"data.{name}: expected a non-empty list of non-empty strings "
            f"(comma-separated on the command line), got {value!r}"
        )


def template_fields(template: str) -> list[str]:
    """The `{placeholder}` names of a template, in order of appearance.

    Raises:
        ConfigError: the template is not a valid format string.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(
            f"data.template: {template!r} is not a valid template ({exc}); write "
            f"placeholders as {{field}} and literal braces as {{{{ and }}}}"
        ) from None
    return [name for _, name, _, _ in parsed if name is not None]


def _check_template(template: str) -> None:
    if not template_fields(template):
        raise ConfigError(
            f"data.template: {template!r} has no {{field}} placeholder; name the text "
            f'fields, e.g. "Review: {{sentence}}\\nSentiment:"'
        )
