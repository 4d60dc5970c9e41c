"""How reports round numbers."""

from __future__ import annotations

import pytest

from edgetune.report import numbers


@pytest.mark.parametrize(
    "write, value, expected",
    [
        (numbers.metric, 0.68751, "0.688"),
        (numbers.metric, 2, "2.000"),
        (numbers.metric, float("nan"), "-"),
        (numbers.metric, "nan", "-"),  # how runs.py stores NaN in JSON
        (numbers.metric, None, "-"),
        (numbers.seconds, 0.19345354879999999, "0.2"),
        (numbers.seconds, 1234.56, "1234.6"),
        (numbers.count, 573352, "573,352"),
        (numbers.megabytes, 421.5, "422"),
        (numbers.size, 365, "365 B"),
        (numbers.size, 764470, "764,470 B (764.47 KB)"),
        (numbers.size, 9_800_000, "9,800,000 B (9.80 MB)"),
        (numbers.size, float("inf"), "-"),
    ],
)
def test_numbers_are_rounded_for_reading(write, value, expected):
    assert write(value) == expected
