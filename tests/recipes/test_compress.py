"""End to end `edgetune compress` on stories260K + SST-2: the run-directory contract and
refused inputs (exit 2, one message, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from edgetune import models

TINY_DATA = ["data.train_size=64", "data.eval_size=16", "data.max_length=32"]


def compress_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "compress",
        "--model",
        str(model),
        "--dataset",
        "sst2",
        "--out",
        str(out),
        "--calib",
        "8",
        *TINY_DATA,
        "progress=false",
        *extra,
    ]


def test_compress_writes_the_run_directory(cli, stories260k_path, shared_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(compress_args(stories260k_path, out, "--prune", "0.3")) == 0
    err = capsys.readouterr().err
    # stories260K has 4 key/value groups of 2 heads, hidden 64: keeping 3 cannot load, so 4
    assert "warning: prune.ratio=0.3 asks to keep 3 of 4 key/value head groups" in err

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["prune"] == {
        "ratio": 0.3,
        "units": "mlp,heads",
        "importance": "activation",
        "calib": 8,
        "layer_ratios": None,
        "ranking": "layer",
        "bias_compensation": False,
    }
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["stage"] for line in lines] == ["before", "after-prune"]
    assert all(0.0 <= line["eval/accuracy"] <= 1.0 for line in lines)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["params_before"] == 260032
    # 30% of each layer's 172 MLP channels go (round(51.6) = 52): 5 layers x 3 x 64 x 52
    assert summary["params_after"] == 260032 - 5 * 3 * 64 * 52
    assert summary["heads_rounded"]["requested_kv_groups"] == 3
    assert summary["heads_rounded"]["kept_kv_groups"] == 4
    assert summary["model_bytes_after"] > 4 * summary["params_after"]
    unpruned = sum(f.stat().st_size for f in stories260k_path.iterdir() if f.is_file())
    assert summary["model_bytes_before"] == unpruned > summary["model_bytes_after"]
    assert summary["eval_examples"] == 16
    for stage in ("before", "after"):
        assert summary[stage]["prefill_ms"] > 0
        assert summary[stage]["decode_tokens_per_s"] > 0
        assert set(summary[stage]["metrics"]) == {"eval/accuracy", "eval/loss"}
    assert summary["peak_rss_mb"] > 0 and summary["wall_s"] > 0

    stock = AutoModelForCausalLM.from_pretrained(out / "model")
    assert stock.config.num_key_value_heads == 4
    model, tokenizer = models.load(str(out / "model"))
    assert sum(p.numel() for p in model.parameters()) == summary["params_after"]
    assert model.config.intermediate_size == 172 - 52
    assert tokenizer("hello")["input_ids"]


def test_compress_mlp_only_keeps_heads_and_warns_nothing(
    cli, stories260k_path, shared_data, tmp_path, capsys
):
    out = tmp_path / "run"
    args = compress_args(stories260k_path, out, "--prune", "0.5", "--prune-units", "mlp")
    args.remove("--calib")
    args.remove("8")
    assert cli([*args, "--importance", "magnitude"]) == 0
    assert "warning" not in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heads_rounded"] is None
    assert summary["params_after"] == 260032 - 5 * 3 * 64 * 86


def test_compress_maps_the_adapter(cli, tiny_args, stories260k_path, shared_data, tmp_path):
    finetuned = tmp_path / "ft"
    # keep=last: the adapter must differ from the base for the check below
    assert cli(tiny_args(finetuned, "train.keep=last", method="fo", steps=2)) == 0
    out = tmp_path / "run"
    args = compress_args(stories260k_path, out, "--prune", "0.5")
    assert cli([*args, "--adapter", str(finetuned / "adapter")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter"] == str(finetuned / "adapter")
    mapped = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert mapped["base_model_name_or_path"] == str(out / "model")
    # before = the fine-tuned run's own held-out score (same model, adapter, rows), not the
    # base model's (initial_eval)
    run_eval = json.loads((finetuned / "summary.json").read_text())
    before = summary["before"]["metrics"]
    assert before["eval/loss"] == pytest.approx(run_eval["eval/loss"], rel=1e-5)
    assert before["eval/loss"] != pytest.approx(run_eval["initial_eval"]["eval/loss"], rel=1e-5)


@pytest.fixture
def verdict_run(cli, tiny_args, tmp_path):
    """A fo run on SST-2 whose adapter learned its own verbalizer and template."""
    finetuned = tmp_path / "ft"
    task = ["data.verbalizer=[bad,good]", "data.template=Film: {sentence} Verdict:"]
    assert cli(tiny_args(finetuned, *task, method="fo", steps=2)) == 0
    return finetuned


def test_compress_scores_the_adapter_on_the_task_its_run_recorded(
    cli, verdict_run, stories260k_path, tmp_path
):
    # Prepare: neither the dataset nor the task named, only the adapter
    out = tmp_path / "run"
    args = compress_args(stories260k_path, out, "--prune", "0.5")
    args = [a for a in args if a not in ("--dataset", "sst2")]
    # Execute
    assert cli([*args, "--adapter", str(verdict_run / "adapter")]) == 0
    # Assert: the run's dataset, verbalizer and template were used and recorded, so the
    # score before compression is the run's own final evaluation
    data = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert data["dataset"] == "sst2" and data["verbalizer"] == ["bad", "good"]
    assert data["template"] == "Film: {sentence} Verdict:"
    run_eval = json.loads((verdict_run / "summary.json").read_text())
    before = json.loads((out / "summary.json").read_text())["before"]["metrics"]
    assert before["eval/loss"] == pytest.approx(run_eval["eval/loss"], rel=1e-5)
    assert before["eval/accuracy"] == pytest.approx(run_eval["eval/accuracy"])


def test_compress_refuses_a_task_that_contradicts_the_adapters_run(
    cli, verdict_run, stories260k_path, tmp_path, capsys
):
    # Prepare
    out = tmp_path / "run"
    args = compress_args(stories260k_path, out, "--prune", "0.5", "data.verbalizer=[poor,fine]")
    # Execute
    status = cli([*args, "--adapter", str(verdict_run / "adapter")])
    # Assert
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "data.verbalizer=['poor', 'fine'] contradicts the task adapter" in err
    assert "records data.verbalizer=['bad', 'good']); drop it" in err
    assert not out.exists()


def test_compress_with_taylor_importance(cli, stories260k_path, shared_data, tmp_path):
    out = tmp_path / "run"
    args = compress_args(stories260k_path, out, "--prune", "0.5", "--importance", "taylor")
    assert cli(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prune"]["importance"] == "taylor"
    assert summary["prune"]["kept_kv_groups"] == 2  # 4 - round(2.0): loadable, no rounding
    assert summary["heads_rounded"] is None
    assert summary["params_after"] < summary["params_before"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--prune", "1.0"), "prune.ratio: 1.0 is outside [0, 1)"),
        (("--prune-units", "mlp,rows"), "prune.units: rows is not a unit kind"),
        (
            ("prune.layer_ratios=0.1,0.2",),
            "layer_ratios has 2 values but the model has 5 decoder layers",
        ),
        (("prune.layer_ratios=0,0,1.5,0,0",), "prune.layer_ratios: [1.5] is not a list of ratios"),
        (
            ("--prune", "0.3", "prune.layer_ratios=0,0,0.5,0,0"),
            "prune.ratio=0.3 would be ignored: with prune.layer_ratios",
        ),
        (("--prune", "0.95", "--prune-units", "layers"), "removes all 5 decoder layers"),
        (("prune.bias_compensation=true",), "prune.bias_compensation has nothing to compensate"),
        (
            ("prune.ranking=global", "prune.layer_ratios=0,0,0.5,0,0"),
            "prune.layer_ratios gives each layer its ratio and prune.ranking=global",
        ),
        (("prune.ranking=globel",), "prune.ranking: 'globel' is not one of layer, global"),
        (("--prune", "0.9"), "ratio 0.9 removes all 4 key/value heads of layer 0"),
        (
            ("--prune", "0.3", "--importance", "magnitude"),
            "prune.calib=8 is not used by prune.importance=magnitude",
        ),
        (("--prune", "0.3", "--calib", "100"), "prune.calib=100 but the training split has 64"),
        (("--quantize", "int4"), "compress.quantize: 'int4' is not one of none, int8"),
        ((), "nothing to do (prune.ratio=0, quantize=none, vocab=none); give --prune R"),
        (("--quantize", "int8"), "prune.calib is not used without pruning (prune.ratio=0)"),
    ],
)
def test_compress_refuses_bad_settings(
    cli, stories260k_path, shared_data, tmp_path, capsys, extra, message
):
    out = tmp_path / "run"
    assert cli(compress_args(stories260k_path, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_compress_refuses_an_unsupported_architecture(
    cli, stories260k_path, shared_data, tmp_path, capsys
):
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=512)).save_pretrained(
        gpt2
    )
    AutoTokenizer.from_pretrained(stories260k_path).save_pretrained(gpt2)
    out = tmp_path / "run"
    assert cli(compress_args(gpt2, out, "--prune", "0.3")) == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel has no model.layers; supported: Llama" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_compress_refuses_an_out_holding_a_run(
    cli, stories260k_path, shared_data, tmp_path, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"stage": "before"}\n')
    assert cli(compress_args(stories260k_path, out, "--prune", "0.3")) == 2
    assert "already holds a run (finished or interrupted); pass --overwrite" in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


def test_an_interrupted_compress_restarts_with_overwrite(
    cli, stories260k_path, shared_data, tmp_path, capsys, run_torn
):
    # Prepare: a reference, and a run killed while logging its after-prune stage (DIR/model
    # is already written), which a plain rerun refuses
    args = ("--prune", "0.3", "--recover", "fo", "--recover-steps", "2", "--threads", "1")
    assert cli(compress_args(stories260k_path, tmp_path / "straight", *args)) == 0
    out = tmp_path / "run"
    run_torn(compress_args(stories260k_path, out, *args), "metrics.jsonl", "stage", "after-prune")
    assert (out / "model").is_dir() and not (out / "summary.json").exists()
    assert cli(compress_args(stories260k_path, out, *args)) == 2
    assert "--overwrite" in capsys.readouterr().err
    # Execute
    assert cli(compress_args(stories260k_path, out, *args, "--overwrite")) == 0
    # Assert: the same run as the uninterrupted one, nothing of the killed one left
    for name in ("metrics.jsonl", "adapter/adapter_model.safetensors", "model/model.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    summaries = [json.loads((d / "summary.json").read_text()) for d in (out, tmp_path / "straight")]
    assert summaries[0]["params_after"] == summaries[1]["params_after"]


def test_compress_help_lists_the_prune_keys(cli, capsys):
    with pytest.raises(SystemExit):
        cli(["compress", "--help"])
    text = capsys.readouterr().out
    keys = ("prune.ratio", "prune.units", "prune.importance", "prune.calib", "adapter")
    for key in (*keys, "prune.layer_ratios", "prune.ranking", "prune.bias_compensation"):
        assert key in text
    for key in ("--recover", "--recover-steps", "--distill", "--teacher", "recover.alpha"):
        assert key in text
    assert "quantize" in text


def read_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["fo", "zo", "prge"])
def test_compress_recovers_with_distillation(
    cli, stories260k_path, shared_data, tmp_path, capsys, method
):
    out = tmp_path / "run"
    recover = ["--recover", method, "--recover-steps", "3", "--distill", "recover.batch_size=4"]
    assert cli(compress_args(stories260k_path, out, "--prune", "0.3", *recover)) == 0
    capsys.readouterr()

    lines = read_lines(out)
    assert [line.get("stage") for line in lines if "stage" in line] == [
        "before",
        "after-prune",
        "after-recover",
    ]
    assert [line["step"] for line in lines if "step" in line] == [1, 2, 3]
    assert not (out / "checkpoints").exists()
    summary = json.loads((out / "summary.json").read_text())
    recovered = summary["recover"]
    assert recovered["method"] == method and recovered["distill"] is True
    assert recovered["steps_done"] == 3
    # finetune's step size: first-order's default, or the ZO recipe's normalised step
    expected = (1e-3, "auto") if method == "fo" else (5e-3, "rms")
    assert (recovered["lr"], recovered["scale"]) == expected
    assert recovered["teacher_forward_passes"] == 3  # once per step, whatever the queries
    assert recovered["trainable_params"] > 0 and recovered["peak_rss_mb"] > 0
    assert recovered["metrics"] == {k: v for k, v in lines[-1].items() if k != "stage"}
    # the saved adapter on the saved pruned model scores what the stage logged
    assert (
        cli(
            [
                "eval",
                "--model",
                str(out / "model"),
                "--adapter",
                str(out / "adapter"),
                "--dataset",
                "sst2",
                *TINY_DATA,
            ]
        )
        == 0
    )
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["eval/loss"] == pytest.approx(recovered["metrics"]["eval/loss"], rel=1e-5)


def test_compress_recovery_continues_the_mapped_adapter(
    cli, tiny_args, stories260k_path, shared_data, tmp_path
):
    finetuned = tmp_path / "ft"
    assert cli(tiny_args(finetuned, method="fo", steps=2)) == 0
    out = tmp_path / "run"
    args = compress_args(
        stories260k_path, out, "--prune", "0.5", "--adapter", str(finetuned / "adapter")
    )
    assert cli([*args, "--recover", "fo", "--recover-steps", "2", "--distill"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recover"]["continued_from"] == str(out / "adapter")
    assert summary["recover"]["metrics"] != summary["after-prune"]["metrics"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    fresh = json.loads((finetuned / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == fresh["r"] and config["base_model_name_or_path"] == str(out / "model")


def test_compress_recovery_without_distillation_reads_no_teacher(
    cli, stories260k_path, shared_data, tmp_path
):
    out = tmp_path / "run"
    args = compress_args(stories260k_path, out, "--prune", "0.3", "--recover", "fo")
    assert cli([*args, "--recover-steps", "2", "recover.lr=0.01", "recover.rank=2"]) == 0
    recovered = json.loads((out / "summary.json").read_text())["recover"]
    assert recovered["teacher_forward_passes"] == 0 and recovered["lr"] == 0.01
    # rank 2 LoRA, r x (in + out) per projection, on the 5 pruned layers: q, o 64 -> 64;
    # k, v 64 -> 32 (4 key/value groups of 8); gate, up, down 64 <-> 120 (172 - 52 channels)
    per_layer = 2 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 120) * 3)
    assert recovered["trainable_params"] == 5 * per_layer


def test_compress_teacher_cache_gives_the_same_run(cli, stories260k_path, shared_data, tmp_path):
    runs = {}
    for cache in ("false", "true"):
        out = tmp_path / cache
        args = compress_args(stories260k_path, out, "--prune", "0.3", "--recover", "fo")
        args += ["--recover-steps", "2", "--distill", f"recover.teacher_cache={cache}"]
        assert cli(args) == 0
        runs[cache] = json.loads((out / "summary.json").read_text())["recover"]
    assert runs["false"]["teacher_forward_passes"] == 2  # one per step
    assert runs["true"]["teacher_forward_passes"] == 8  # 64 training rows in batches of 8
    # full-vocabulary logits at one position per row: 512 fp32 each for stories260K
    assert runs["true"]["teacher_logits_mb"] == pytest.approx(64 * 512 * 4 / 2**20)
    assert runs["false"]["teacher_logits_mb"] == pytest.approx(8 * 512 * 4 / 2**20)
    assert runs["true"]["metrics"]["eval/loss"] == pytest.approx(
        runs["false"]["metrics"]["eval/loss"], rel=1e-4
    )


def test_compress_distills_from_a_named_teacher(cli, stories260k_path, shared_data, tmp_path):
    out = tmp_path / "run"
    args = compress_args(stories260k_path, out, "--prune", "0.3", "--recover", "zo")
    assert (
        cli([*args, "--recover-steps", "2", "--distill", "--teacher", str(stories260k_path)]) == 0
    )
    assert json.loads((out / "summary.json").read_text())["recover"]["teacher"] == str(
        stories260k_path
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--recover", "fo", "--recover-steps", "0"), "recover.steps: expected a number > 0"),
        (("--recover", "ft"), "recover.method: 'ft' is not one of none, fo, zo, prge"),
        (("--distill",), "recover.distill=True is not used without recovery"),
        (("recover.lr=0.1",), "recover.lr=0.1 is not used without recovery"),
        (("--recover", "fo", "--teacher", "x"), "recover.teacher is not used with no --distill"),
        (
            ("--recover", "fo", "recover.queries=4"),
            "recover.queries is not used with recover.method=fo",
        ),
        (
            ("--recover", "fo", "recover.scale=rms"),
            "recover.scale is not used with recover.method=fo",
        ),
        (
            ("--recover", "zo", "recover.scale=adam"),
            "recover.scale: 'adam' is not one of auto, rms, none",
        ),
        (
            ("--recover", "zo", "--distill", "recover.alpha=1.5"),
            "recover.alpha: expected a value in [0, 1]",
        ),
        (
            ("--recover", "zo", "--distill", "recover.temperature=0"),
            "recover.temperature: expected a number > 0",
        ),
        (("--prune", "0", "--recover", "fo"), "use edgetune finetune for that"),
    ],
)
def test_compress_refuses_bad_recovery_settings(
    cli, stories260k_path, shared_data, tmp_path, capsys, extra, message
):
    out = tmp_path / "run"
    assert cli(compress_args(stories260k_path, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_compress_refuses_a_teacher_of_another_vocabulary(
    cli, stories260k_path, shared_data, tmp_path, capsys
):
    teacher = tmp_path / "teacher"
    model, tokenizer = models.load(str(stories260k_path))
    model.resize_token_embeddings(model.config.vocab_size + 8)
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    out = tmp_path / "run"
    args = compress_args(
        stories260k_path,
        out,
        "--prune",
        "0.3",
        "--recover",
        "fo",
        "--distill",
        "--teacher",
        str(teacher),
    )
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert f"recover.teacher={teacher} has another vocabulary" in err
    assert "Traceback" not in err and not out.exists()


def test_compress_recovery_divergence_names_the_compress_fix(
    cli, stories260k_path, shared_data, tmp_path, capsys
):
    # a step size that makes the first update non-finite (on some CPUs lr=1000 only
    # saturated the tiny model's logits, so the loss never diverged)
    out = tmp_path / "run"
    args = compress_args(stories260k_path, out, "--prune", "0.3", "--recover", "fo")
    assert cli([*args, "--recover-steps", "6", "recover.lr=1e30"]) == 2
    err = capsys.readouterr().err
    assert "recovery diverged: loss nan at step 2" in err
    assert "lower recover.lr (now 1e+30) and run compress again" in err
    assert "--resume" not in err and "Traceback" not in err
    assert read_lines(out)[-1] == {"step": 2, "loss": "nan", "diverged": True}


def _eval_loss(cli, model: Path, out: Path) -> float:
    """`edgetune eval --model MODEL` on the rows compress evaluated; its eval/loss."""
    args = ["eval", "--model", str(model), "--dataset", "sst2", "--out", str(out), *TINY_DATA]
    assert cli([*args, "progress=false"]) == 0
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["eval/loss"]


def test_compress_with_layer_ratios_and_bias_compensation(
    cli, stories260k_path, shared_data, tmp_path
):
    out = tmp_path / "run"
    ratios = "prune.layer_ratios=0,0.2,0.4,0.4,0.6"
    assert cli(compress_args(stories260k_path, out, ratios, "prune.bias_compensation=true")) == 0
    summary = json.loads((out / "summary.json").read_text())
    widths = summary["prune"]["layer_widths"]
    assert [w["intermediate_size"] for w in widths] == [172, 138, 103, 103, 69]
    assert [w["num_key_value_heads"] for w in widths] == [4, 3, 2, 2, 2]
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["edgetune_layer_widths"] == widths
    assert config["mlp_bias"] and config["attention_bias"]  # the compensation biases
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(out / "model")
    loaded, _ = models.load(str(out / "model"))
    assert sum(p.numel() for p in loaded.parameters()) == summary["params_after"]
    after = summary["after"]["metrics"]["eval/loss"]
    assert _eval_loss(cli, out / "model", tmp_path / "eval") == pytest.approx(after, rel=1e-5)


def test_compress_with_global_ranking(cli, stories260k_path, shared_data, tmp_path):
    out = tmp_path / "run"
    args = compress_args(stories260k_path, out, "--prune", "0.3", "prune.ranking=global")
    assert cli([*args, "--prune-units", "mlp"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    widths = [w["intermediate_size"] for w in summary["prune"]["layer_widths"]]
    assert sum(widths) == 5 * 172 - round(0.3 * 5 * 172) and len(set(widths)) > 1
    loaded, _ = models.load(str(out / "model"))
    assert sum(p.numel() for p in loaded.parameters()) == summary["params_after"]


def test_compress_removes_whole_layers(cli, stories260k_path, shared_data, tmp_path):
    out = tmp_path / "run"
    args = compress_args(stories260k_path, out, "--prune", "0.4", "--prune-units", "mlp,layers")
    assert cli(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["prune"]["kept_layers"]) == 3  # round(0.4 * 5) = 2 layers go
    # 3 layers left, each without 40% of its 172 channels (round(68.8) = 69 go)
    per_layer = 260032 - 64 * 512 - 64
    per_layer //= 5
    assert summary["params_after"] == 260032 - 2 * per_layer - 3 * 3 * 64 * 69
    stock = AutoModelForCausalLM.from_pretrained(out / "model")  # uniform widths: stock
    assert (stock.config.num_hidden_layers, stock.config.intermediate_size) == (3, 103)
    after = summary["after"]["metrics"]["eval/loss"]
    assert _eval_loss(cli, out / "model", tmp_path / "eval") == pytest.approx(after, rel=1e-5)


def test_compress_refuses_layer_pruning_of_a_one_layer_model(
    cli, stories260k_path, shared_data, tmp_path, capsys
):
    one = tmp_path / "one"
    models.tiny_llama(vocab_size=512, num_hidden_layers=1).save_pretrained(one)
    AutoTokenizer.from_pretrained(stories260k_path).save_pretrained(one)
    out = tmp_path / "run"
    assert cli(compress_args(one, out, "--prune", "0.3", "--prune-units", "layers")) == 2
    err = capsys.readouterr().err
    assert "layer pruning needs at least 2 decoder layers and this model has 1" in err
    assert "Traceback" not in err and not out.exists()


def test_compress_refuses_bias_compensation_with_magnitude_importance(
    cli, stories260k_path, shared_data, tmp_path, capsys
):
    out = tmp_path / "run"
    args = compress_args(stories260k_path, out, "--prune", "0.3", "prune.bias_compensation=true")
    args.remove("--calib")
    args.remove("8")
    assert cli([*args, "--importance", "magnitude"]) == 2
    err = capsys.readouterr().err
    assert "prune.bias_compensation needs the calibration activations" in err
    assert "use --importance activation or taylor" in err and not out.exists()


def quantize_args(model: Path, out: Path, *extra: str) -> list[str]:
    """compress_args without --calib (unused without pruning, so refused)."""
    args = compress_args(model, out, *extra)
    at = args.index("--calib")
    return args[:at] + args[at + 2 :]


def test_compress_quantize_int8_writes_an_int8_model(
    cli, stories260k_path, shared_data, tmp_path, capsys
):
    # Prepare
    out = tmp_path / "run"
    # Execute
    assert cli(quantize_args(stories260k_path, out, "--quantize", "int8")) == 0
    capsys.readouterr()
    # Assert: two stages, no pruning; 35 layers' weights 3.8x smaller, the file 0.36x
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["stage"] for line in lines] == ["before", "after-quantize"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prune"] is None and summary["params_after"] == 260032
    quant = summary["after-quantize"]
    assert quant == summary["after"]
    assert quant["method"] == "int8" and quant["adapter_merged"] is False
    assert quant["linear_weight_bytes_before"] == 4 * 5 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 172 * 3)
    assert quant["linear_weight_bytes_before"] / quant["linear_weight_bytes_after"] > 3.7
    assert (
        summary["model_bytes_after"]
        < 0.45 * (stories260k_path / "model.safetensors").stat().st_size
    )
    assert quant["prefill_ms"] > 0 and quant["decode_tokens_per_s"] > 0
    # measured: eval loss 0.8286 -> 0.8346 on these 16 rows
    before, after = summary["before"]["metrics"], quant["metrics"]
    assert abs(after["eval/loss"] - before["eval/loss"]) < 0.05
    assert sorted(p.name for p in (out / "model").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.int8.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    # and `edgetune eval` on DIR/model scores what the run measured
    args = ["eval", "--model", str(out / "model"), "--dataset", "sst2", *TINY_DATA]
    assert cli(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["eval/loss"] == pytest.approx(after["eval/loss"], rel=1e-5)


def test_compress_prunes_then_quantizes(cli, stories260k_path, shared_data, tmp_path):
    out = tmp_path / "run"
    args = compress_args(stories260k_path, out, "--prune", "0.3", "--quantize", "int8")
    assert cli(args) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["stage"] for line in lines] == ["before", "after-prune", "after-quantize"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params_after"] == 260032 - 5 * 3 * 64 * 52
    # the pruned layers (MLP 172 -> 120 channels) in fp32, then int8 + one fp32 scale a row
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 120 * 3
    rows = 64 + 32 + 32 + 64 + 120 + 120 + 64
    quant = summary["after-quantize"]
    assert quant["linear_weight_bytes_before"] == 5 * 4 * per_layer
    assert quant["linear_weight_bytes_after"] == 5 * (per_layer + 4 * rows)
    assert not (out / "model" / "model.safetensors").exists()
    model, _ = models.load(str(out / "model"))
    assert model.config.intermediate_size == 120
    assert model.model.layers[0].mlp.up_proj.weight_int8.shape == (120, 64)


def test_compress_merges_the_adapter_before_quantizing(
    cli, tiny_args, stories260k_path, shared_data, tmp_path, capsys
):
    # Prepare: a fine-tuned LoRA on the fp32 model
    finetuned = tmp_path / "ft"
    assert cli(tiny_args(finetuned, method="fo", steps=2)) == 0
    out = tmp_path / "run"
    args = quantize_args(stories260k_path, out, "--quantize", "int8")
    # Execute
    assert cli([*args, "--adapter", str(finetuned / "adapter")]) == 0
    capsys.readouterr()
    # Assert: DIR/model alone (no DIR/adapter) scores like the fp32 model + adapter did,
    # and `edgetune eval` of it reproduces the after-quantize score
    summary = json.loads((out / "summary.json").read_text())
    quant = summary["after-quantize"]
    assert quant["adapter_merged"] is True and not (out / "adapter").exists()
    before = summary["before"]["metrics"]["eval/loss"]
    run_eval = json.loads((finetuned / "summary.json").read_text())["eval/loss"]
    assert before == pytest.approx(run_eval, rel=1e-5)
    assert abs(quant["metrics"]["eval/loss"] - before) < 0.05
    assert cli(["eval", "--model", str(out / "model"), "--dataset", "sst2", *TINY_DATA]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["eval/loss"] == pytest.approx(quant["metrics"]["eval/loss"], rel=1e-5)


def test_compress_refuses_an_int8_model(cli, stories260k_path, shared_data, tmp_path, capsys):
    # Prepare: the int8 folder a previous compress run writes
    first = tmp_path / "first"
    assert cli(quantize_args(stories260k_path, first, "--quantize", "int8")) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    # Execute
    assert cli(quantize_args(first / "model", out, "--quantize", "int8")) == 2
    # Assert
    err = capsys.readouterr().err
    assert "is already an int8 model; compress the fp32 model it came from" in err
    assert "Traceback" not in err and not out.exists()


def test_compress_quantize_int8_dynamic_writes_a_smoothed_model(
    cli, stories260k_path, shared_data, tmp_path, capsys
):
    # Prepare
    out = tmp_path / "run"
    # Execute: smoothing calibrates on --calib training rows, with or without pruning
    assert cli(compress_args(stories260k_path, out, "--quantize", "int8-dynamic")) == 0
    capsys.readouterr()
    # Assert
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["stage"] for line in lines] == ["before", "after-quantize"]
    summary = json.loads((out / "summary.json").read_text())
    quant = summary["after-quantize"]
    assert quant["method"] == "int8-dynamic" and quant["weights_on_disk"].startswith("fp32")
    assert quant["linear_weight_bytes_before"] / quant["linear_weight_bytes_after"] > 3.7
    # measured: eval loss 0.8286 -> 0.7897 on these 16 rows (int8 noise on a 1 MB model)
    before, after = summary["before"]["metrics"], quant["metrics"]
    assert abs(after["eval/loss"] - before["eval/loss"]) < 0.05
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["edgetune_int8_dynamic"] == {"format": 1, "keep_fp32": ["lm_head"]}
    # DIR/model: smoothed fp32 weights; stock transformers reads the same fp32 function
    stock = AutoModelForCausalLM.from_pretrained(out / "model")
    original = AutoModelForCausalLM.from_pretrained(stories260k_path)
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, original(ids).logits, atol=1e-4)
    # edgetune loads it as dynamic int8, and `edgetune eval` scores what the run measured
    loaded, _ = models.load(str(out / "model"))
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "Linear"
    assert type(loaded.model.layers[0].mlp.down_proj).__module__.startswith("torch.ao")
    args = ["eval", "--model", str(out / "model"), "--dataset", "sst2", *TINY_DATA]
    assert cli(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["eval/loss"] == pytest.approx(after["eval/loss"], rel=1e-5)


def test_compress_prunes_then_quantizes_dynamic(cli, stories260k_path, shared_data, tmp_path):
    out = tmp_path / "run"
    args = compress_args(stories260k_path, out, "--prune", "0.3", "--quantize", "int8-dynamic")
    assert cli(args) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["stage"] for line in lines] == ["before", "after-prune", "after-quantize"]
    model, _ = models.load(str(out / "model"))
    assert model.config.intermediate_size == 120
    assert model.model.layers[0].mlp.up_proj.weight().shape == (120, 64)


def test_compress_and_finetune_refuse_a_dynamic_int8_model(
    cli, tiny_args, stories260k_path, shared_data, tmp_path, capsys
):
    # Prepare
    first = tmp_path / "first"
    assert cli(compress_args(stories260k_path, first, "--quantize", "int8-dynamic")) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    # Execute + Assert: compress again
    assert cli(compress_args(first / "model", out, "--quantize", "int8-dynamic")) == 2
    err = capsys.readouterr().err
    assert "is already an int8 model; compress the fp32 model it came from" in err
    assert "Traceback" not in err and not out.exists()
    # and a LoRA fine-tune, which would need a backward through the int8 layers
    args = tiny_args(tmp_path / "ft", method="fo", steps=2)
    args[args.index("--model") + 1] = str(first / "model")
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "linear layers are dynamic int8" in err and "no backward" in err
    assert "Traceback" not in err
    # and an adapter on top of it at evaluation
    args = ["eval", "--model", str(first / "model"), "--dataset", "sst2", *TINY_DATA]
    assert cli([*args, "--adapter", str(tmp_path / "ft")]) == 2
    err = capsys.readouterr().err
    assert "an adapter cannot wrap a dynamic int8 model" in err and "Traceback" not in err


def test_compress_magnitude_pruning_with_dynamic_int8_reads_calib_for_the_smoothing(
    cli, stories260k_path, shared_data, tmp_path
):
    # magnitude importance reads no activations, but int8-dynamic smooths on --calib rows
    out = tmp_path / "run"
    args = compress_args(stories260k_path, out, "--prune", "0.3", "--quantize", "int8-dynamic")
    assert cli([*args, "--importance", "magnitude"]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["prune"]["calib"] == 8 and config["prune"]["importance"] == "magnitude"


@pytest.mark.parametrize(
    ("method", "lr", "expected"),
    [
        ("zo", None, (5e-3, "rms")),  # the default ZO recipe, as finetune runs it
        ("prge", None, (5e-3, "rms")),
        ("zo", 2e-3, (2e-3, "none")),  # a given step size keeps raw scalars
        ("fo", None, (1e-3, "auto")),  # first-order: finetune's default, no scalars
    ],
)
def test_recovery_takes_finetunes_step_size_and_zo_recipe(method, lr, expected):
    from edgetune.recipes.recover import RecoverConfig

    cfg = RecoverConfig(method=method, lr=lr)
    assert (cfg.lr, cfg.scale) == expected
