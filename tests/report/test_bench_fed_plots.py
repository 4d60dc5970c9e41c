"""`edgetune bench fed` plots: model and data in the title, round 0 on both axes."""

from __future__ import annotations

from edgetune.bench import fed
from edgetune.runs import RunDir


def test_bench_fed_figures_name_the_setting_and_keep_round_0(federate_run):
    rows = RunDir(federate_run, resume=True).read_metrics()
    results = {"fedit (fo)": {"rows": rows}, "fedkseed (zo)": {"rows": rows}}
    figs = fed.figures(results, "/data/models/stories260K", 10)
    rounds = figs["bench_fed_accuracy_vs_rounds.png"].axes[0]
    data = figs["bench_fed_accuracy_vs_bytes.png"].axes[0]
    assert rounds.get_title().startswith("stories260K on bbc-news, 10 clients, Dirichlet 0.5")
    assert (rounds.get_xlabel(), rounds.get_ylabel()) == ("round", "held-out accuracy")
    assert (
        data.get_xlabel() == "cumulative bytes uploaded (log scale)"
        and data.get_xscale() == "symlog"
    )
    # round 0 (zero-shot, nothing uploaded) logs no total_bytes_up; it is still plotted
    assert "total_bytes_up" not in rows[0]
    assert [line.get_xdata()[0] for line in data.lines] == [0, 0]
    assert [t.get_text() for t in data.get_legend().get_texts()] == ["fedit (fo)", "fedkseed (zo)"]
