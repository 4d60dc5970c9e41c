"""Tiny random-weight models for unit tests (milliseconds per forward pass)."""

from __future__ import annotations

from typing import Any


def tiny_llama(vocab_size: int = 128, seed: int = 0, **overrides: Any) -> Any:
    """A 2-layer Llama causal LM with random weights.

    Args:
        vocab_size: vocabulary size.
        seed: seeds the weight initialisation (explicitly, then restores the global RNG).
        **overrides: LlamaConfig fields to change.

    Returns:
        A `LlamaForCausalLM` in eval mode, fp32.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    # HF initialises weights from the global RNG; fork it so tests stay independent.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**fields))
    return model.eval()


# One small random config per architecture family: 4 blocks, hidden 64, 4 query heads in
# 2 key/value groups where the family has groups. Gemma 3 alternates sliding-window and
# global blocks (window 4, so a 32-token row feels the difference), both kinds on each side
# of a cut at 2 and in an order a cut that ignored them would get wrong; Qwen3 and Gemma 3
# set head_dim explicitly as their real configs do (and Gemma 3 scales attention by it).
_ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2)
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, **_ATTENTION)
TINY_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_DECODER)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_DECODER)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DECODER, head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_DECODER, sliding_window=None)),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            _DECODER,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=4,
            layer_types=[
                "sliding_attention",
                "full_attention",
                "full_attention",
                "sliding_attention",
            ],
        ),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_DECODER)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=4, n_head=4)),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            word_embed_proj_dim=64,
        ),
    ),
}


def tiny_causal_lm(family: str, vocab_size: int = 512, seed: int = 0, **overrides: Any) -> Any:
    """A 4-block random causal LM of one architecture family (`TINY_FAMILIES`).

    Args:
        family: a key of `TINY_FAMILIES`.
        vocab_size: vocabulary size (512: stories260K's tokenizer).
        seed: seeds the weight initialisation (explicitly, then restores the global RNG).
        **overrides: config fields to change.

    Returns:
        The family's causal LM in eval mode, fp32, with untied embeddings and token ids
        1 / 2 as BOS / EOS (stories260K's).
    """
    import torch
    import transformers

    config_name, model_name, fields = TINY_FAMILIES[family]
    fields = dict(fields, vocab_size=vocab_size, tie_word_embeddings=False)
    fields.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    fields.update(overrides)
    config = getattr(transformers, config_name)(**fields)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
    return model.eval()
