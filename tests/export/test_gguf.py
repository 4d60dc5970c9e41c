"""GGUF export: the files llama.cpp runs, checked against PyTorch with real llama.cpp.

The llama.cpp tests need llama-cpp-python (`pip install 'edgetune[llama]'`); without it
they skip with the reason, except under `CI=true`, where they fail. Tolerances are what
was measured on stories260K (F32 KV cache): logits within ~2e-5 of PyTorch, with or
without a LoRA adapter; q8_0 agrees with F32 on 99.5 % of next-token predictions over 200
TinyStories tokens (perplexity 3.796 vs 3.801), q4_0 on 84.5 % (perplexity 4.117).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetune.errors import ConfigError
from edgetune.export.gguf import GGUF_TYPES, export_gguf
from edgetune.export.llama_cpp import (
    gguf_parity,
    gguf_quality,
    llama_cpp_generate,
    llama_cpp_logits,
)
from edgetune.models import load
from edgetune.peft import attach
from edgetune.peft.config import PeftConfig

PROMPT = "Once upon a time, there was a little girl named Lily."
LOGIT_TOL = 1e-4  # measured max abs difference: 1.2e-5 (base), 2.1e-5 (adapter)


@pytest.fixture(scope="module")
def llama_cpp() -> None:
    """Skip (fail under CI=true) when llama.cpp's Python binding is missing."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        pass
    else:
        return
    msg = "llama-cpp-python is not installed (pip install 'edgetune[llama]')"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def stories(stories260k_path):
    torch.set_num_threads(1)
    return load(str(stories260k_path))


@pytest.fixture(scope="module")
def exported(stories, tmp_path_factory) -> dict[str, Path]:
    """stories260K as f32, q8_0 and q4_0 GGUF files."""
    model, tokenizer = stories
    out = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(model, tokenizer, out, quant=q).model for q in GGUF_TYPES}


def _random_lora(stories260k_path: Path, targets: list[str], out: Path):
    """A PEFT LoRA on stories260K with random, non-zero B (so it changes the output),
    saved as a PEFT folder; returns (PeftModel, adapter folder)."""
    model, _ = load(str(stories260k_path))
    adapter = attach(model, PeftConfig(method="lora", rank=4, alpha=8.0, target_modules=targets), 0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in adapter.model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return adapter.model.eval(), adapter.save(out)


@pytest.fixture(scope="module")
def lora(stories260k_path, tmp_path_factory):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return _random_lora(stories260k_path, targets, tmp_path_factory.mktemp("lora"))


def _prompt_ids(tokenizer) -> torch.Tensor:
    return tokenizer(PROMPT, return_tensors="pt").input_ids


def _torch_greedy(model, tokenizer, max_tokens: int = 32) -> str:
    """PyTorch's greedy continuation of PROMPT, as text after the prompt's text."""
    ids = _prompt_ids(tokenizer)
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0])[len(tokenizer.decode(ids[0])) :]


def _torch_logits(model, tokenizer) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=_prompt_ids(tokenizer)).logits[0].numpy()


# --- the writer, read back without llama.cpp ------------------------------------------


def test_quantized_file_keeps_norms_and_odd_rows_f32(exported):
    import gguf

    for quant, qtype in (("q8_0", "Q8_0"), ("q4_0", "Q4_0")):
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(exported[quant]).tensors}
        assert types["blk.0.attn_q.weight"] == qtype and types["token_embd.weight"] == qtype
        assert types["blk.0.attn_norm.weight"] == "F32"
        assert types["blk.0.ffn_down.weight"] == "F32"  # rows of 172, not a multiple of 32
        assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    sizes = [exported[q].stat().st_size for q in ("f32", "q8_0", "q4_0")]
    assert sizes[0] > sizes[1] > sizes[2]


def test_adapter_gguf_has_llama_cpp_lora_layout(stories, lora, tmp_path):
    import gguf

    model, tokenizer = stories
    result = export_gguf(model, tokenizer, tmp_path, adapter_dir=lora[1])
    reader = gguf.GGUFReader(result.adapter)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)
    shapes = {t.name: list(t.shape) for t in reader.tensors}  # ggml order: (in, out)
    assert shapes["blk.0.attn_k.weight.lora_a"] == [64, 4]  # A: r x in
    assert shapes["blk.0.attn_k.weight.lora_b"] == [4, 32]  # B: out x r (4 kv heads x 8)
    assert len(shapes) == 2 * 7 * 5
    assert result.bytes == result.model.stat().st_size + result.adapter.stat().st_size


def test_transformers_loads_the_f32_gguf_back(stories, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = stories
    path = exported["f32"]
    back = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    back_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert back_tokenizer(PROMPT).input_ids == tokenizer(PROMPT).input_ids
    diff = np.abs(_torch_logits(back, tokenizer) - _torch_logits(model, tokenizer)).max()
    assert diff < 1e-5


# --- llama.cpp against PyTorch --------------------------------------------------------


def test_f32_gguf_in_llama_cpp_matches_pytorch(llama_cpp, stories, exported):
    model, tokenizer = stories
    text = llama_cpp_generate(exported["f32"], PROMPT, max_tokens=32)
    logits = llama_cpp_logits(exported["f32"], _prompt_ids(tokenizer)[0].tolist())
    assert text == _torch_greedy(model, tokenizer) and len(text) > 40
    assert np.abs(logits - _torch_logits(model, tokenizer)).max() < LOGIT_TOL


def test_lora_adapter_gguf_in_llama_cpp_matches_peft(llama_cpp, stories, lora, tmp_path):
    model, tokenizer = stories
    peft_model, folder = lora
    result = export_gguf(model, tokenizer, tmp_path, adapter_dir=folder)
    ids = _prompt_ids(tokenizer)[0].tolist()
    text = llama_cpp_generate(result.model, PROMPT, max_tokens=32, adapter_path=result.adapter)
    logits = llama_cpp_logits(result.model, ids, adapter_path=result.adapter)
    expected = _torch_logits(peft_model, tokenizer)
    assert text == _torch_greedy(peft_model, tokenizer)
    assert np.abs(logits - expected).max() < LOGIT_TOL
    assert np.abs(logits - llama_cpp_logits(result.model, ids)).max() > 1.0  # it matters


def test_merged_lora_gguf_in_llama_cpp_matches_peft(llama_cpp, stories, lora, tmp_path):
    model, tokenizer = stories
    peft_model, folder = lora
    result = export_gguf(model, tokenizer, tmp_path, adapter_dir=folder, merge=True)
    logits = llama_cpp_logits(result.model, _prompt_ids(tokenizer)[0].tolist())
    assert result.adapter is None and result.model.name == "model-merged-f32.gguf"
    assert llama_cpp_generate(result.model, PROMPT) == _torch_greedy(peft_model, tokenizer)
    assert np.abs(logits - _torch_logits(peft_model, tokenizer)).max() < LOGIT_TOL


def test_lora_on_the_tied_lm_head_merges_and_refuses_unmerged(
    llama_cpp, stories, stories260k_path, tmp_path
):
    model, tokenizer = stories
    peft_model, folder = _random_lora(stories260k_path, ["q_proj", "lm_head"], tmp_path / "run")
    result = export_gguf(model, tokenizer, tmp_path / "gguf", adapter_dir=folder, merge=True)
    logits = llama_cpp_logits(result.model, _prompt_ids(tokenizer)[0].tolist())
    assert np.abs(logits - _torch_logits(peft_model, tokenizer)).max() < LOGIT_TOL
    with pytest.raises(ConfigError, match="merge=True"):
        export_gguf(model, tokenizer, tmp_path / "gguf", adapter_dir=folder)


@pytest.mark.parametrize(
    ("quant", "min_agreement", "max_ppl_ratio"), [("q8_0", 0.95, 1.02), ("q4_0", 0.75, 1.15)]
)
def test_quantized_gguf_stays_close_to_f32(
    llama_cpp, stories, exported, shared_data, quant, min_agreement, max_ppl_ratio
):
    _, tokenizer = stories
    text = (shared_data / "datasets" / "tinystories_val" / "tinystories_val.txt").read_text()
    token_ids = tokenizer(text[:2000]).input_ids[:200]
    quality = gguf_quality(exported["f32"], exported[quant], token_ids)
    print(quant, quality)
    assert quality["top1_agreement"] >= min_agreement
    assert quality["ppl_quant"] / quality["ppl_f32"] < max_ppl_ratio
    assert 2.0 < quality["ppl_f32"] < 8.0  # a pretrained model on its own domain


def test_gguf_export_checks_llama_cpp_against_pytorch(
    llama_cpp, lora, stories260k_path, cli, tmp_path, capsys
):
    # Prepare: the random LoRA's folder, exported unmerged beside the base
    _, folder = lora
    out = tmp_path / "gguf"
    args = ["export", "--model", str(stories260k_path), "--adapter", str(folder)]
    # Execute
    status = cli([*args, "--format", "gguf", "--out", str(out)])
    # Assert: base + adapter in llama.cpp gave PEFT's logits, in the summary and manifest
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    manifest = json.loads((out / "export.json").read_text())
    assert 0.0 < summary["parity_max_abs"] < LOGIT_TOL
    assert summary["parity_top1_agreement"] == 1.0
    assert manifest["facts"]["parity_max_abs"] == summary["parity_max_abs"]


def test_gguf_export_without_llama_cpp_says_the_check_was_skipped(
    stories260k_path, cli, tmp_path, capsys, monkeypatch
):
    # Prepare
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    out = tmp_path / "gguf"
    # Execute
    status = cli(
        ["export", "--model", str(stories260k_path), "--format", "gguf", "--out", str(out)]
    )
    # Assert: one line says so, and the manifest records why
    captured = capsys.readouterr()
    assert status == 0
    skipped = [line for line in captured.err.splitlines() if "parity check skipped" in line]
    assert skipped == [
        "edgetune: GGUF parity check skipped: llama.cpp's Python binding is not installed "
        "(pip install 'edgetune[llama]')"
    ]
    facts = json.loads((out / "export.json").read_text())["facts"]
    assert facts["parity_max_abs"] is None and "not installed" in facts["parity_skipped"]


def test_an_f32_gguf_far_from_pytorch_is_an_error(llama_cpp, stories, exported):
    # Prepare: PyTorch's logits, one of them moved by 0.5
    model, tokenizer = stories
    ids = _prompt_ids(tokenizer)[0].tolist()
    expected = _torch_logits(model, tokenizer)
    expected[3, 7] += 0.5
    # Execute / Assert: refused against the moved logits, accepted against the true ones
    with pytest.raises(ConfigError, match=r"differ from PyTorch's by up to 0\.5"):
        gguf_parity(exported["f32"], ids, expected, "f32")
    near = gguf_parity(exported["f32"], ids, _torch_logits(model, tokenizer), "f32")
    assert near["parity_max_abs"] < LOGIT_TOL and near["parity_top1_agreement"] == 1.0


# --- bad input ------------------------------------------------------------------------


def test_truncated_gguf_is_a_config_error_naming_the_file(llama_cpp, exported, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(exported["f32"].read_bytes()[:300_000])
    with pytest.raises(ConfigError, match="cut.gguf"):
        llama_cpp_logits(cut, [1, 2, 3])
    with pytest.raises(ConfigError, match="cut.gguf"):
        llama_cpp_generate(exported["f32"], PROMPT, adapter_path=cut)


def test_missing_llama_cpp_says_how_to_install(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    with pytest.raises(ConfigError, match=r"pip install 'edgetune\[llama\]'"):
        llama_cpp_logits(exported["f32"], [1, 2, 3])


@pytest.mark.parametrize(
    ("hidden", "layers", "problem"),
    [(32, 2, "trained on another model"), (64, 6, "layers.5.self_attn.q_proj, which this model")],
)
def test_adapter_for_another_base_is_refused(stories, tmp_path, hidden, layers, problem):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, tokenizer = stories
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=512,
            hidden_size=hidden,
            intermediate_size=172,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=4,
        )
    )
    adapter = attach(other, PeftConfig(method="lora", rank=2, target_modules=["q_proj"]), 0)
    folder = adapter.save(tmp_path / "other")
    with pytest.raises(ConfigError, match=problem):
        export_gguf(model, tokenizer, tmp_path / "out", adapter_dir=folder)
    assert not (tmp_path / "out").exists()


def test_unknown_quant_lists_the_supported_ones(stories, tmp_path):
    model, tokenizer = stories
    with pytest.raises(ConfigError, match="q4_0"):
        export_gguf(model, tokenizer, tmp_path, quant="q5_k")


def test_merge_without_an_adapter_is_refused(stories, tmp_path):
    model, tokenizer = stories
    with pytest.raises(ConfigError, match="adapter_dir"):
        export_gguf(model, tokenizer, tmp_path, merge=True)


def test_non_llama_model_is_refused(stories, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokenizer = stories
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        export_gguf(gpt2, tokenizer, tmp_path)


@pytest.mark.parametrize(
    ("key", "fix"),
    [("edgetune_layer_widths", "uniform widths"), ("edgetune_int8", "--gguf-type q8_0")],
)
def test_pruned_per_layer_and_int8_models_are_refused(stories260k_path, tmp_path, key, fix):
    model, tokenizer = load(str(stories260k_path))
    model.config.update({key: [{"intermediate_size": 100}] if "widths" in key else {"format": 1}})
    with pytest.raises(ConfigError, match=fix):
        export_gguf(model, tokenizer, tmp_path)


def test_failed_export_leaves_no_file(stories, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    model, _ = stories
    word_level = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    )
    with pytest.raises(ConfigError, match="BPE"):
        export_gguf(model, word_level, tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- SmolLM2 --------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_f32_gguf_in_llama_cpp_matches_pytorch(llama_cpp, tmp_path):
    import gguf

    torch.set_num_threads(1)
    model, tokenizer = load("smollm2-135m")
    result = export_gguf(model, tokenizer, tmp_path)
    fields = gguf.GGUFReader(result.model).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() in ("gpt-2", "smollm")
    text = llama_cpp_generate(result.model, PROMPT, max_tokens=32)
    assert text == _torch_greedy(model, tokenizer) and len(text) > 40
