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
