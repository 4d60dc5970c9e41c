"""The demo's report.md opens with what was run, from the runs' own configs and summaries."""

from __future__ import annotations

import json

from edgetune.recipes import demo
from edgetune.runs import RunDir
from edgetune.train.config import RECIPE_LR


def test_demo_report_opens_with_the_settings_of_each_run(finetune_run):
    summary = json.loads((finetune_run / "summary.json").read_text())
    config = RunDir(finetune_run, resume=True).read_config()
    summaries, configs = {"zo": summary, "fo": summary}, {"zo": config, "fo": config}
    text = demo.render(
        summaries,
        summary["initial_eval"],
        "eval/accuracy",
        str(config["model"]),
        12.34,
        {"zo": demo.ZO_LABELS["mezo"], **demo.LABELS},  # the fixture is a MeZO run
        configs,
    )
    lines = text.splitlines()
    assert lines[0] == "# edgetune demo: stories260K, zero-shot vs ZO LoRA vs first-order LoRA"
    assert lines[2] == (
        "- **data**: sst2, 64 training examples, 16 held-out, at most 32 tokens each; seed 0"
    )
    # no --lr in the quick ZO run: the default ZO recipe's step size
    zo_line = f"- **ZO LoRA (MeZO)**: lora rank 8, 4 steps of batch 4, learning rate {RECIPE_LR:g}"
    assert lines[3] == zo_line
    row = next(x for x in lines if x.startswith("| ZO LoRA (MeZO) |"))
    assert row.endswith(f"| {summary['wall_s']:.1f} |")
    assert lines[-1].endswith("total demo time 12.3 s.")


def test_the_compression_heading_names_each_stage_that_ran():
    cfg = {"prune": {"ratio": 0.2, "units": "mlp,heads"}, "recover": {"method": "none"}}
    assert demo.what_was_done(cfg) == "pruned 20 % (mlp,heads)"
    cfg["recover"] = {"method": "fo", "steps": 5, "distill": True}
    cfg["quantize"] = "int8"
    assert demo.what_was_done(cfg) == (
        "pruned 20 % (mlp,heads) + fo recovery with distillation, 5 steps + int8"
    )
    assert demo.what_was_done({"prune": {"ratio": 0.0}, "quantize": "int8"}) == "int8"


def test_a_stage_without_its_own_speed_reads_the_model_it_trained_beside():
    summary = {
        "before": {"prefill_ms": 10.0},
        "after-prune": {"prefill_ms": 7.0},
        "after-recover": {"metrics": {}},
        "after": {"metrics": {}},
    }
    assert demo.stage_speed(summary, "after-recover")["prefill_ms"] == 7.0
    assert demo.stage_speed(summary, "before")["prefill_ms"] == 10.0
    one_stage = {"before": {"prefill_ms": 10.0}, "after": {"prefill_ms": 6.0}}  # speed kept
    assert demo.stage_speed(one_stage, "after-prune")["prefill_ms"] == 6.0  # under "after"
