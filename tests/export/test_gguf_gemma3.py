"""GGUF export of Gemma 3 text models (`export/gguf_gemma3.py`): what the file holds, the
settings llama.cpp reads checked in llama.cpp, and the ones it would run differently
refused. The LoRA adapter and CLI path is in tests/models/test_families.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from edgetune.errors import ConfigError
from edgetune.export.gguf import export_gguf
from edgetune.export.llama_cpp import gguf_parity
from edgetune.models.tiny import tiny_causal_lm
from edgetune.peft import PeftConfig, attach

PROMPT = "Once upon a time, there was a little girl named Lily."


@pytest.fixture(scope="module")
def tokenizer(stories260k_path):
    return AutoTokenizer.from_pretrained(stories260k_path)


def test_norms_are_one_plus_w_and_the_attention_pattern_is_written(tokenizer, tmp_path):
    import gguf

    # Prepare: random norm weights, so 1 + w is told apart from w
    model = tiny_causal_lm("gemma3")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(generator=torch.Generator().manual_seed(0))
    # Execute
    reader = gguf.GGUFReader(export_gguf(model, tokenizer, tmp_path).model)
    # Assert: every one of the seven norms is 1 + w, the projections are as they are
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    state = model.state_dict()
    pairs = {
        "blk.1.attn_norm.weight": "model.layers.1.input_layernorm.weight",
        "blk.1.post_attention_norm.weight": "model.layers.1.post_attention_layernorm.weight",
        "blk.1.ffn_norm.weight": "model.layers.1.pre_feedforward_layernorm.weight",
        "blk.1.post_ffw_norm.weight": "model.layers.1.post_feedforward_layernorm.weight",
        "blk.1.attn_q_norm.weight": "model.layers.1.self_attn.q_norm.weight",
        "blk.1.attn_k_norm.weight": "model.layers.1.self_attn.k_norm.weight",
        "output_norm.weight": "model.norm.weight",
    }
    for gguf_name, hf_name in pairs.items():
        np.testing.assert_allclose(tensors[gguf_name], state[hf_name].numpy() + 1, rtol=1e-6)
    q = state["model.layers.1.self_attn.q_proj.weight"].numpy()
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"], q)  # NEOX: not permuted
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "gemma3"
    assert fields["gemma3.attention.sliding_window"] == 4
    assert fields["gemma3.attention.sliding_window_pattern"] == [True, False, False, True]
    assert fields["gemma3.rope.freq_base"] == 1e6 and fields["gemma3.rope.freq_base_swa"] == 1e4
    assert fields["gemma3.attention.key_length"] == 16


def test_settings_llama_cpp_reads_keep_parity_in_llama_cpp(tokenizer, tmp_path):
    pytest.importorskip("llama_cpp")
    # Prepare: six blocks in llama.cpp's default pattern, every setting it reads moved off
    # its default (each one moves the logits by 0.2-0.8 when it is not written)
    rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
    }
    model = tiny_causal_lm(
        "gemma3", num_hidden_layers=6, layer_types=None, rope_parameters=rope,
        final_logit_softcapping=0.5,
    )  # fmt: skip
    ids = tokenizer(PROMPT).input_ids
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    # Execute
    written = export_gguf(model, tokenizer, tmp_path)
    facts = gguf_parity(written.model, ids, expected, "f32")
    # Assert: within llama.cpp's fp16 GELU (measured 3e-4 at logits below 1)
    assert facts["parity_max_abs"] < 1e-3
    assert facts["parity_top1_agreement"] == 1.0


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (dict(query_pre_attn_scalar=256), "query_pre_attn_scalar=256, but llama.cpp"),
        (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0"),
        (dict(hidden_activation="gelu"), "uses 'gelu', llama.cpp's gemma3 the tanh"),
        (dict(use_bidirectional_attention=True), "attends bidirectionally"),
        (
            dict(
                rope_parameters={
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                }
            ),
            "scales the sliding blocks' rotary embedding ('linear')",
        ),
        (
            dict(
                rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                    "full_attention": {
                        "rope_type": "dynamic",
                        "factor": 2.0,
                        "rope_theta": 1e6,
                    },
                }
            ),
            "rope_type 'dynamic'",
        ),
    ],  # fmt: skip
)
def test_settings_llama_cpp_would_run_differently_are_refused(
    tokenizer, tmp_path, setting, message
):
    model = tiny_causal_lm("gemma3", **setting)
    with pytest.raises(ConfigError, match="export it to ONNX instead") as refused:
        export_gguf(model, tokenizer, tmp_path / "out")
    assert message in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_the_27b_attention_scale_is_what_llama_cpp_uses_at_62_blocks(tokenizer, tmp_path):
    # llama.cpp scales a 62-block gemma3 by hidden / heads (32 here), not head_dim (16)
    shape = dict(num_hidden_layers=62, layer_types=None, num_attention_heads=2)
    shape.update(num_key_value_heads=1, hidden_size=64, intermediate_size=64)
    with pytest.raises(ConfigError, match="uses 32 for a 62-block model"):
        export_gguf(tiny_causal_lm("gemma3", **shape), tokenizer, tmp_path / "a")
    written = export_gguf(
        tiny_causal_lm("gemma3", **shape, query_pre_attn_scalar=32), tokenizer, tmp_path / "b"
    )
    assert written.model.is_file()


def test_a_merged_lora_keeps_parity_in_llama_cpp(tokenizer, tmp_path):
    pytest.importorskip("llama_cpp")
    # Prepare: a LoRA on every projection with a random B, saved as PEFT saves it
    adapter = attach(tiny_causal_lm("gemma3"), PeftConfig(rank=2), seed=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in adapter.model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    adapter.model.save_pretrained(tmp_path / "adapter")
    ids = tokenizer(PROMPT).input_ids
    with torch.no_grad():
        expected = adapter.model(input_ids=torch.tensor([ids])).logits[0].numpy()
        base = tiny_causal_lm("gemma3")(input_ids=torch.tensor([ids])).logits[0].numpy()
    # Execute: W + scaling * B @ A folded in, then the norms offset as for the base
    written = export_gguf(
        tiny_causal_lm("gemma3"), tokenizer, tmp_path / "out", adapter_dir=tmp_path / "adapter",
        merge=True,
    )  # fmt: skip
    facts = gguf_parity(written.model, ids, expected, "f32")
    # Assert: the adapter moves the logits far more than llama.cpp's GELU does
    assert written.adapter is None and written.model.name == "model-merged-f32.gguf"
    assert facts["parity_max_abs"] < 5e-3 < np.abs(expected - base).max()
    assert facts["parity_top1_agreement"] == 1.0
