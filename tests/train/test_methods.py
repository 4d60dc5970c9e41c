"""The training-method registry: every method train.method accepts builds a stepper, and
each refuses exactly the zo settings it does not declare."""

from __future__ import annotations

import pytest

from edgetune.errors import ConfigError
from edgetune.train.config import TRAIN_METHODS
from edgetune.train.factory import METHODS, check_zo_read
from edgetune.zo.config import ZOConfig

# A non-default value for every zo setting.
GIVEN = {
    "eps": 1e-2,
    "queries": 2,
    "estimator": "one-sided",
    "max_queries": 8,
    "var_threshold": 0.5,
    "optimizer": "momentum",
    "beta1": 0.5,
    "beta2": 0.5,
    "exact_restore": "true",
    "scale": "rms",
    "parallel_inner": False,
}


def test_every_method_train_method_accepts_is_registered():
    assert set(METHODS) == set(TRAIN_METHODS)
    assert set(GIVEN) == {f for f in ZOConfig.__dataclass_fields__}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_refuses_exactly_the_zo_settings_it_does_not_read(method):
    spec = METHODS[method]
    for name, value in GIVEN.items():
        zo = ZOConfig(**{name: value})
        if name in spec.zo_settings(zo):
            check_zo_read(method, zo)  # accepted
        else:
            with pytest.raises(ConfigError, match=f"zo.{name}"):
                check_zo_read(method, zo)


def test_estimator_settings_are_read_only_with_their_estimator():
    check_zo_read("zo", ZOConfig(estimator="fwdgrad", max_queries=8))
    with pytest.raises(ConfigError, match="zo.estimator=fwdgrad with --method zo"):
        check_zo_read("zo", ZOConfig(max_queries=8))
