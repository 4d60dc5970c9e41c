"""DataConfig validation: each bad value names its field and what was expected."""

from __future__ import annotations

import pytest

from edgetune.data import DataConfig
from edgetune.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"task": "regression"}, "data.task"),
        ({"max_length": 0}, "data.max_length: expected an integer >= 4"),
        ({"eval_size": -1}, "data.eval_size: expected an integer >= 0"),
        ({"train_size": 0}, "data.train_size"),
        ({"max_new_tokens": 0}, "data.max_new_tokens"),
        ({"labels": []}, "data.labels: expected a non-empty list"),
        ({"labels": ["a", "a"]}, "data.labels: class names must be unique"),
        ({"verbalizer": ["ok", ""]}, "data.verbalizer"),
        ({"template": "no placeholder here"}, "data.template"),
        ({"template": "broken {brace"}, "data.template"),
        ({"dataset": " "}, "data.dataset"),
    ],
)
def test_bad_values_raise_with_the_field_name(kwargs, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        DataConfig(**kwargs)


def test_defaults_are_valid_and_plain():
    cfg = DataConfig()

    assert (cfg.dataset, cfg.task, cfg.max_length, cfg.eval_size) == ("bbc-news", None, 128, 200)
