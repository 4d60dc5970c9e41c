"""What a finetune run leaves for use elsewhere: an adapter that names a loadable base
model, a filled model card, a config.yaml with the labels, verbalizer and template that
were used, and a summary whose `initial_eval` is the zero-shot (step 0) evaluation."""

from __future__ import annotations

import json

import pytest
import yaml

from edgetune.cli import main
from edgetune.models import tiny_llama
from edgetune.models.builtin import base_model_id, builtin_for_base_model
from edgetune.peft import PeftConfig, attach

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def sst2_run(tmp_path, stories260k_path, shared_data):
    del shared_data

    def make(name, *extra):
        out = tmp_path / name
        args = [
            "finetune",
            "--model",
            str(stories260k_path),
            "--dataset",
            "sst2",
            "--method",
            "fo",
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "data.train_size=32",
            "data.eval_size=8",
            "data.max_length=32",
            "train.eval_every=2",
            "train.progress=false",
            *extra,
        ]
        assert main(args) == 0
        return out

    return make


def test_a_builtin_made_from_a_hub_model_is_recorded_by_its_hub_id(tmp_path):
    assert base_model_id("smollm2-135m") == SMOLLM2_HUB_ID
    assert builtin_for_base_model(SMOLLM2_HUB_ID) == "smollm2-135m"
    adapter = attach(tiny_llama(), PeftConfig(rank=2, target_modules=["q_proj"]), seed=0)

    saved = adapter.save(tmp_path, base_model_id("smollm2-135m"))

    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == SMOLLM2_HUB_ID


def test_local_model_is_recorded_by_its_path_and_the_card_is_filled(sst2_run, stories260k_path):
    out = sst2_run("run")
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(stories260k_path.resolve())

    card = (out / "adapter" / "README.md").read_text()
    assert "More Information Needed" not in card
    assert f"base_model: {stories260k_path.resolve()}" in card
    assert "- dataset: `sst2`" in card and "- task: classification" in card
    assert "train.method=fo, 4 steps" in card and "- peft.rank: 8" in card
    assert f"- eval/accuracy: {summary['eval/accuracy']:.4f}" in card
    assert "- verbalizer: `terrible`, `great`" in card
    assert "edgetune finetune" in card


def test_config_yaml_records_the_labels_verbalizer_and_template_used(sst2_run):
    out = sst2_run("run")
    data = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert data["task"] == "classification"
    assert data["labels"] == ["negative", "positive"]
    assert data["verbalizer"] == ["terrible", "great"]
    assert data["template"] == "Review: {sentence}\nSentiment:"
    assert data["text_fields"] == ["sentence"] and data["label_field"] == "label"


def test_initial_eval_is_the_step_0_evaluation_or_absent(sst2_run):
    with_baseline = sst2_run("baseline")
    without = sst2_run("no-baseline", "train.eval_at_start=false")

    summary = json.loads((with_baseline / "summary.json").read_text())
    step0 = json.loads((with_baseline / "metrics.jsonl").read_text().splitlines()[0])
    assert step0["step"] == 0
    assert summary["initial_eval"] == {k: v for k, v in step0.items() if k != "step"}
    assert "initial_eval" not in json.loads((without / "summary.json").read_text())
