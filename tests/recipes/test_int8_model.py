"""A LoRA fine-tuned over the frozen int8 model that `edgetune compress --quantize int8`
writes: fo, zo and prge through the real CLI, then `edgetune eval` of the same model and
adapter; methods that would train base weights are refused."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from edgetune.compress.int8_folder import WEIGHTS_FILE, save_int8
from edgetune.compress.quantize import quantize_int8
from edgetune.models import load


@pytest.fixture
def int8_model(stories260k_path, tmp_path):
    model, tokenizer = load(str(stories260k_path))
    save_int8(quantize_int8(model), tmp_path / "int8")
    tokenizer.save_pretrained(tmp_path / "int8")
    return tmp_path / "int8"


def _on(args: list[str], model) -> list[str]:
    args = list(args)
    args[args.index("--model") + 1] = str(model)
    return args


@pytest.mark.parametrize("method", ["fo", "zo", "prge"])
def test_finetune_and_eval_on_an_int8_model(cli, tiny_args, int8_model, tmp_path, capsys, method):
    # Prepare
    out = tmp_path / "ft"
    before = (int8_model / WEIGHTS_FILE).read_bytes()
    # Execute
    assert cli(_on(tiny_args(out, method=method), int8_model)) == 0
    capsys.readouterr()
    eval_args = ["eval", "--model", str(int8_model), "--adapter", str(out / "adapter")]
    eval_args += ["--dataset", "sst2", "data.eval_size=16", "data.max_length=32"]
    assert cli(eval_args) == 0
    printed = json.loads(capsys.readouterr().out)
    # Assert: a LoRA over the 35 int8 layers trained (loss moved), the int8 file is
    # untouched, and eval reproduces the run's own final score
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/loss"] != pytest.approx(summary["initial_eval"]["eval/loss"], rel=1e-6)
    lora = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(lora) == 2 * 35 and all(".lora_" in k for k in lora)
    assert (int8_model / WEIGHTS_FILE).read_bytes() == before
    assert printed["eval/loss"] == pytest.approx(summary["eval/loss"], rel=1e-5)


def test_full_finetuning_of_an_int8_model_is_refused(cli, tiny_args, int8_model, tmp_path, capsys):
    out = tmp_path / "ft"
    assert cli(_on(tiny_args(out, "--peft", "full", method="fo"), int8_model)) == 2
    err = capsys.readouterr().err
    assert "peft.method=full trains base weights, but this model's linear weights" in err
    assert "Traceback" not in err
