"""The CLI surface: help, models listing, eval/generate, and bad input that must produce
a clear error (exit status 2, message naming the problem and the fix)."""

from __future__ import annotations

import json
import re

import pytest


def test_help_lists_config_keys(capsys, cli):
    with pytest.raises(SystemExit) as info:
        cli(["finetune", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for key in ("train.steps", "zo.eps", "peft.rank", "data.verbalizer", "optim.schedule"):
        assert key in out


def test_models_command_lists_builtins(capsys, cli):
    assert cli(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "stories260k" in out and "minilm-l6" in out
    assert "gemma3-270m" in out and "license: Gemma Terms of Use" in out


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_file", "does not exist"),
        ("missing_column", "sentense"),
        ("unknown_label", "maybe"),
        ("empty", "empty"),
        ("unknown_key", "did you mean 'train.steps'"),
        ("bad_value", "train.steps: expected an integer"),
        ("bad_model", "cannot find model"),
    ],
)
def test_bad_input_gives_the_intended_error(tmp_path, tiny_args, cli, capsys, case, message):
    good = _write(tmp_path / "good.csv", "text,label\nnice film,pos\nawful film,neg\n" * 20)
    args = {
        "missing_file": ["--dataset", str(tmp_path / "nope.csv")],
        "missing_column": ["--dataset", good, "--text-field", "sentense"],
        "unknown_label": [
            "--dataset",
            _write(tmp_path / "l.csv", "text,label\na,pos\nb,neg\nc,maybe\n" * 10),
            "--labels",
            "pos,neg",
        ],
        "empty": ["--dataset", _write(tmp_path / "e.csv", "text,label\n")],
        "unknown_key": ["--dataset", good, "train.step=3"],
        "bad_value": ["--dataset", good, "train.steps=many"],
        "bad_model": ["--dataset", good, "--model", str(tmp_path / "no-model")],
    }[case]
    base = tiny_args(tmp_path / "run", "data.eval_size=4")
    status = cli([*base, *args])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err, err
    assert "Traceback" not in err


def test_eval_scores_a_trained_adapter_like_the_run_did(
    tmp_path, tiny_args, cli, capsys, stories260k_path
):
    out = tmp_path / "run"
    assert cli(tiny_args(out, method="fo", steps=4)) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    status = cli(
        [
            "eval",
            "--model",
            str(stories260k_path),
            "--dataset",
            "sst2",
            "--adapter",
            str(out / "adapter"),
            "data.train_size=64",
            "data.eval_size=16",
            "data.max_length=32",
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    assert status == 0
    result = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert result["eval/accuracy"] == pytest.approx(summary["eval/accuracy"])
    assert result["eval/loss"] == pytest.approx(summary["eval/loss"], rel=1e-5)


def test_generate_continues_a_story(cli, capsys, stories260k_path):
    assert (
        cli(
            [
                "generate",
                "--model",
                str(stories260k_path),
                "--prompt",
                "Once upon a time",
                "--max-new-tokens",
                "12",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out.strip()
    assert len(text.split()) >= 3


@pytest.mark.parametrize(
    "zo, label, method",
    [("prge-top6", "ZO LoRA (P-RGE q=4, top 6 blocks)", "prge"), ("mezo", "ZO LoRA (MeZO)", "zo")],
)
def test_quick_demo_writes_report_and_plot(
    tmp_path, cli, stories260k_path, shared_data, zo, label, method
):
    del shared_data
    args = ["demo", "--quick", "--zo", zo, "--model", str(stories260k_path), "--out", str(tmp_path)]
    assert cli(args) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| zero-shot |" in report and f"| {label} |" in report
    assert "## Federated: FedIT over a mixed fleet" in report and "| device |" in report
    assert (tmp_path / "fed" / "report.md").exists()
    config = (tmp_path / "zo" / "config.yaml").read_text()
    assert f"method: {method}" in config
    # the default runs LoRA on the top blocks only (2 of 5 here), the 3 below as the trunk
    trunk = json.loads((tmp_path / "zo" / "summary.json").read_text())["trunk_blocks"]
    assert trunk == (3 if zo == "prge-top6" else 0)
    assert ("on the top 2 blocks" in report) == (zo == "prge-top6")
    assert "| first-order LoRA |" in report
    png = (tmp_path / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    compressed = json.loads((tmp_path / "compress" / "summary.json").read_text())
    assert "## Compressed: the first-order model, int8-dynamic" in report
    before_mb, after_mb = (compressed[f"model_bytes_{k}"] / 1e6 for k in ("before", "after"))
    assert f"| before | {compressed['params_before']:,} | {before_mb:.1f} |" in report
    assert f"| after (after-quantize) | {compressed['params_after']:,} | {after_mb:.1f} |" in report
    quant = compressed["after-quantize"]
    ratio = quant["linear_weight_bytes_before"] / quant["linear_weight_bytes_after"]
    assert ratio > 3.5 and f"MB int8 ({ratio:.2f}x smaller); weights on disk: fp32" in report
    assert compressed["adapter"] == str(tmp_path / "fo" / "adapter")
    # the deployment: a merged Q8_0 GGUF that llama.cpp ran on held-out examples
    assert "## Deployed: the first-order model as a GGUF file for llama.cpp" in report
    assert (tmp_path / "gguf" / "model-merged-q8_0.gguf").stat().st_size > 100_000
    assert re.search(r"llama\.cpp, greedy, on 10 held-out examples: \d+ of them", report)
