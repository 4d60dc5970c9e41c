"""The benchmark scorer over llama.cpp's logits (`edgetune.eval.llama_cpp`) against the
same scorer over PyTorch's, on stories260K's F32 GGUF export: the ending log-likelihoods
agree to 1e-3 (llama.cpp's logits are within ~2e-5 of PyTorch's) and so do the metrics.
Skips without llama-cpp-python (fails under CI=true)."""

from __future__ import annotations

import os

import pytest
import torch

from edgetune.eval import hellaswag
from edgetune.eval.choice import encode_choices, ending_logliks
from edgetune.eval.llama_cpp import LlamaCppCausalLM
from edgetune.export.gguf import export_gguf
from edgetune.export.llama_cpp import binding_available, open_llama
from edgetune.models import load


@pytest.fixture(scope="module")
def stories(stories260k_path):
    torch.set_num_threads(1)
    return load(str(stories260k_path))


@pytest.fixture(scope="module")
def gguf_model(stories, tmp_path_factory):
    if not binding_available():
        msg = "llama-cpp-python is not installed (pip install 'edgetune[llama]')"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    model, tokenizer = stories
    path = export_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf"), quant="f32").model
    llm = open_llama(path, n_ctx=tokenizer.model_max_length)
    yield LlamaCppCausalLM(llm)
    llm.close()


def test_llama_cpp_logits_give_the_same_ending_scores(stories, gguf_model, shared_data):
    # Prepare
    model, tokenizer = stories
    tasks = hellaswag.load(shared_data / hellaswag.SHARED_FILE, 10, seed=3)
    encoded = [
        encode_choices(tokenizer, t.context, t.endings, tokenizer.model_max_length, t.where)
        for t in tasks
    ]
    # Execute
    with torch.no_grad():
        ours = [ending_logliks(model, encoded[i : i + 2]) for i in range(0, 10, 2)]
    theirs = [ending_logliks(gguf_model, encoded[i : i + 2]) for i in range(0, 10, 2)]
    # Assert
    for a, b in zip(sum(ours, []), sum(theirs, []), strict=True):
        assert a.tolist() == pytest.approx(b.tolist(), abs=1e-3)
    assert hellaswag.score(gguf_model, tokenizer, tasks, 8) == hellaswag.score(
        model, tokenizer, tasks, 8
    )
