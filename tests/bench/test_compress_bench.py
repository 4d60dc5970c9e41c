"""`edgetune bench compress`: which runs it plans, how it reads a real compress run, how
it judges the targets; and the whole `--quick` benchmark through the CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from edgetune.bench import compress as bench
from edgetune.cli import build_parser, main


def _row(label, accuracy, prefill_ms, prefill_x=1.0, decode_x=1.0, loss=0.0, seed=0, **extra):
    return {
        "label": label,
        "seed": seed,
        "accuracy": accuracy,
        "params": 100e6,
        "file_mb": 400.0,
        "prefill_ms": prefill_ms,
        "decode_tps": 50.0,
        "prefill_x": prefill_x,
        "decode_x": decode_x,
        "loss_points": loss,
        "linear_x": None,
        **extra,
    }


def test_the_plan_gives_every_row_and_a_second_seed_to_the_30_percent_distillation():
    s = bench.settings("smollm2-135m", quick=False, threads=2, seeds=[0, 1])
    runs = bench.plan(s)
    labels = [label for r in runs for label, _ in r.rows]
    assert labels[0] == "unpruned" and labels.count("unpruned") == 2  # each seed's base
    for pct in (10, 20, 30, 50):
        assert {f"{pct} % pruned", f"{pct} % + FO", f"{pct} % + FO + distill"} <= set(labels)
    assert labels.count("30 % + ZO + distill") == 2 and "10 % + ZO + distill" not in labels
    assert labels.count("30 % + FO + distill") == 2 and labels.count("30 % + FO") == 1
    assert labels.count("20 % + FO + distill") == 1
    assert labels[-7:-3] == ["int8", "30 % + int8", "int8-dynamic", "30 % + int8-dynamic"]
    assert labels[-3:] == ["vocabulary (task)", "vocabulary + int8", "vocabulary, label head"]
    # FO +- distill per ratio, ZO at 30 %, seed 1, two int8 kinds alone and after pruning,
    # three vocabulary runs
    assert len(runs) == 4 * 2 + 1 + 2 + 4 + 3
    zo = next(r for r in runs if r.name == "prune30-zo-distill-s1")
    args = bench.compress_args(s, zo, Path("A"))
    assert args[args.index("--recover") + 1] == "zo" and "--distill" in args
    assert args[args.index("--seed") + 1] == "1" and "recover.batch_size=16" in args
    assert "data.max_length=64" in args and not any(a.startswith("train.") for a in args)
    base = bench.base_args(s, 1)
    assert base[base.index("--seed") + 1] == "1" and base.count("--seed") == 1
    assert "train.eval_batch_size=25" in base and base[base.index("--steps") + 1] == "30"


def test_mean_rows_average_the_seeds_and_keep_each_accuracy():
    rows = bench.mean_rows(
        [_row("a", 0.8, 10.0), _row("a", 0.9, 12.0, seed=1), _row("b", 0.5, 5.0)]
    )
    assert [r["label"] for r in rows] == ["a", "b"]
    assert rows[0]["accuracy"] == pytest.approx(0.85) and rows[0]["prefill_ms"] == 11.0
    assert rows[0]["seed_accuracies"] == [0.8, 0.9] and rows[1]["seed_accuracies"] == [0.5]


def test_the_pareto_front_holds_the_rows_nothing_beats_on_both_axes():
    rows = [_row("fast", 0.7, 5.0), _row("good", 0.9, 20.0), _row("worse", 0.6, 8.0)]
    rows.append(_row("tie", 0.7, 6.0))
    assert bench.pareto(rows) == {"fast", "good"}


def test_targets_say_pass_or_miss_with_the_miss_size():
    s = bench.settings("smollm2-135m", quick=False, threads=2, seeds=[0])
    results = [
        _row("unpruned", 0.91, 100.0),
        _row("30 % + FO + distill", 0.89, 70.0, prefill_x=1.42, decode_x=1.35, loss=-0.01),
        _row("30 % + ZO + distill", 0.85, 70.0, prefill_x=1.42, decode_x=1.2, loss=-0.05),
        _row("int8", 0.9, 60.0, prefill_x=1.6, decode_x=1.5, loss=0.0, linear_x=3.9),
    ]
    memory = {
        "lm": {"fp32_inference_mb": 1000.0, "zo_int8_mb": 700.0, "runtime_mb": 220.0},
        "last": {"fp32_inference_mb": 800.0, "zo_int8_mb": 440.0, "runtime_mb": 220.0},
    }
    text = bench.render(results, memory, s, "test machine", "p.png")
    assert "prefill 1.42x and decode 1.35x >= 1.3x, accuracy loss 1.0 <= 2 points: PASS" in text
    assert "decode 1.20x >= 1.3x, accuracy loss 5.0 <= 2 points: MISS (speed 1.20x" in text
    assert "int8: linear weights 3.90x smaller (>= 3.5x), prefill 1.60x and decode 1.50x" in text
    assert "loss 0.0 (<= 1 point): PASS" in text
    assert "peak 700 MB vs fp32 inference 1000 MB = 0.70x (<= 0.6x): MISS (+0.10x)" in text
    assert "(the classification tasks' logits_to_keep=1): process peak 440 MB vs fp32 " in text
    assert "inference 800 MB = 0.55x (<= 0.6x): PASS; the Python + torch runtime alone" in text
    assert "| **unpruned** | 100.00 M | 400.0 | 100.0 (1.00x) |" in text
    assert text.count("| – | – |") == 4  # no perplexity, no HellaSwag measured in these rows
    assert "| **int8** |" in text and "| 30 % + ZO + distill |" in text  # int8 is faster and
    assert "| 30 % + FO + distill |" in text  # more accurate than both


def test_rows_are_read_from_a_real_compress_run(tmp_path, stories260k_path, shared_data):
    # Prepare: a real pruning run from a real task adapter (what every row starts from)
    del shared_data
    s = bench.settings(str(stories260k_path), quick=True, threads=1, seeds=[0])
    base = ["finetune", "--model", s.model, "--out", str(tmp_path / "base"), *s.data, *s.base]
    assert main([*base, "--threads", "1", "train.progress=false"]) == 0
    run = bench.Run("p", ["--prune", "0.3"], [("unpruned", "before"), ("30 %", "after-prune")])
    args = bench.compress_args(s, run, tmp_path / "base" / "adapter")
    # Execute
    assert main(["compress", "--model", s.model, "--out", str(tmp_path / "p"), *args]) == 0
    before = bench.row_values(tmp_path / "p", "before")
    after = bench.row_values(tmp_path / "p", "after-prune")
    ppl = bench.final_scores(s, tmp_path / "p", tmp_path / "p-ppl")
    # Assert
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    stages = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert before["accuracy"] == stages[0]["eval/accuracy"] and before["prefill_x"] == 1.0
    assert after["accuracy"] == stages[1]["eval/accuracy"]
    assert after["params"] == summary["params_after"] < before["params"]
    assert after["prefill_x"] == summary["before"]["prefill_ms"] / summary["after"]["prefill_ms"]
    assert after["loss_points"] == pytest.approx(after["accuracy"] - before["accuracy"])
    assert after["file_mb"] == summary["model_bytes_after"] / 1e6
    assert before["file_mb"] == summary["model_bytes_before"] / 1e6 > after["file_mb"]
    ppl_summary = json.loads((tmp_path / "p-ppl" / "summary.json").read_text())
    assert ppl["perplexity"] == pytest.approx(math.exp(ppl_summary["eval/loss"]))
    assert ppl_summary["adapter"].endswith("p-ppl-adapter")  # the pruned run's adapter
    assert 1.0 < ppl["perplexity"] < 1000.0
    again = bench.final_scores(s, tmp_path / "p", tmp_path / "p-ppl")  # a re-run replaces
    assert again["perplexity"] == pytest.approx(ppl["perplexity"])
    # HellaSwag acc_norm of the same saved model (and adapter), with its interval
    hs = json.loads((tmp_path / "p-ppl-hs" / "summary.json").read_text())
    assert hs["benchmark"] == "hellaswag" and hs["adapter"].endswith("p-ppl-hs-adapter")
    assert hs["eval_examples"] == bench.QUICK_HELLASWAG_TASKS
    assert ppl["hellaswag"] == hs["eval/acc_norm"] == again["hellaswag"]
    assert ppl["hellaswag_low"] <= ppl["hellaswag"] <= ppl["hellaswag_high"]


def _compress_has(flag: str) -> bool:
    sub = build_parser()._subparsers._group_actions[0].choices["compress"]  # noqa: SLF001
    return any(flag in a.option_strings for a in sub._actions)  # noqa: SLF001


@pytest.mark.slow  # ~20 processes (fine-tunes, compress runs, evals): 1-3 minutes
@pytest.mark.integration
@pytest.mark.skipif(
    not (_compress_has("--recover") and _compress_has("--quantize")),
    reason="needs edgetune compress --recover and --quantize (recovery and int8 slices)",
)
def test_quick_bench_writes_every_row_the_targets_and_the_plot(tmp_path, shared_data):
    del shared_data
    out = tmp_path / "docs" / "BENCHMARKS.md"
    argv = ["bench", "compress", "--quick", "--seeds", "0,1", "--threads", "1"]
    assert main([*argv, "--work", str(tmp_path / "w"), "--output", str(out)]) == 0
    text = out.read_text()
    assert "<!-- bench:compress -->" in text and "--seeds 0,1 --quick`" in text
    for label in ("unpruned", "30 % pruned", "30 % + FO", "30 % + FO + distill", "int8"):
        assert f"| {label} |" in text or f"| **{label}** |" in text
    assert "30 % + ZO + distill: prefill" in text and "ZO LoRA on the int8 base" in text
    for label in ("vocabulary (task)", "vocabulary + int8", "vocabulary, label head"):
        assert f"| {label} |" in text or f"| **{label}** |" in text
    assert re.search(r"- vocabulary \+ int8: file \d+\.\d %, peak RSS \d+\.\d %", text)
    assert "- vocabulary, label head: prefill" in text
    unpruned = next(line for line in text.splitlines() if "unpruned" in line and "|" in line)
    assert re.search(r"\| 0\.\d{3} \[0\.\d{3}, 0\.\d{3}\] \|$", unpruned)  # HellaSwag
    png = (tmp_path / "docs" / "bench_compress_pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_pareto_plot_is_a_png(tmp_path):
    rows = [_row("fast", 0.7, 5.0), _row("good", 0.9, 20.0), _row("worse", 0.6, 8.0)]
    bench.plot_pareto(rows, tmp_path / "p.png", "stories260K")
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
