"""Gemma 3 270M, the second real built-in model (Gemma Terms of Use, not an OSI license:
used here for tests and benchmarks only). Slow: the first load joins and converts the
253 MB GGUF (about 3 minutes on 2 cores), later loads read the fp32 cache folder."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from edgetune.models import list_models, load


@pytest.fixture(scope="module")
def gemma3_available() -> None:
    rows = {r["name"]: r for r in list_models()}
    if not rows["gemma3-270m"]["available"]:
        reason = f"gemma3-270m is not installed: {rows['gemma3-270m']['path']}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.mark.slow
def test_gemma3_270m_loads_and_generates(gemma3_available):
    model, tokenizer = load("gemma3-270m")
    assert model.config.model_type == "gemma3_text" and model.config.vocab_size == 262144
    assert sum(p.numel() for p in model.parameters()) == 268_098_176  # tied 262,144 x 640
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]) == " the capital of the country of France."


@pytest.mark.slow
def test_gemma3_270m_one_training_step_changes_the_adapter_and_the_loss(
    gemma3_available, cli, shared_data, tmp_path
):
    del shared_data
    out = tmp_path / "ft"
    args = ["finetune", "--model", "gemma3-270m", "--dataset", "sst2", "--method", "fo"]
    args += ["--steps", "1", "--batch-size", "4", "--out", str(out), "train.keep=last"]
    args += ["data.train_size=16", "data.eval_size=8", "data.max_length=32"]
    assert cli([*args, "train.progress=false", "optim.lr=1e-3"]) == 0
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/loss"] != summary["initial_eval"]["eval/loss"]
