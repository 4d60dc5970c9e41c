"""`edgetune bench robust`: how a cell is judged and the best rule chosen (the runs
themselves are the benchmark, not a test)."""

from __future__ import annotations

from edgetune.bench.robust import render, verdict


def _cell(loss, updates=8, rejected=0, capped=0):
    return {
        "loss": loss,
        "attacker_updates": updates,
        "rejected": ["norm"] * rejected,
        "capped": capped,
    }


def test_verdicts_name_what_the_server_did():
    assert verdict(_cell(2.05, rejected=8), 2.0) == "2.050 (+0.050, rejected)"
    assert verdict(_cell(2.03), 2.0) == "2.030 (+0.030, bounded)"
    assert verdict(_cell(2.10), 2.0) == "2.100 (+0.100, HURT)"
    assert verdict(_cell(2.01, capped=8), 2.0) == "2.010 (+0.010, capped, bounded)"
    assert verdict(_cell(2.01, rejected=3), 2.0) == "2.010 (+0.010, bounded)"


def test_the_best_rule_is_the_one_with_the_smallest_worst_case():
    results = {
        "fedit": {
            "mean": {"honest": _cell(2.0), "signflip": _cell(2.2), "nan": _cell(2.0, rejected=8)},
            "median": {"honest": _cell(2.1), "signflip": _cell(2.12), "nan": _cell(2.1)},
        }
    }
    text = render(results, "stories260k", 4, 10, "test machine")
    assert "| median | 2.100 | 2.120 (+0.020, bounded) | 2.100 (+0.000, bounded) |" in text
    assert "Best rule for fedit: median, worst attack costs +0.020 (+1.0 %" in text
    assert "meets the 2 % target" in text
