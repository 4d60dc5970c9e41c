"""`edgetune generate`: greedy continuation of a prompt (optionally with an adapter)."""

from __future__ import annotations

import torch

from edgetune.errors import ConfigError
from edgetune.recipes.evaluate import load_adapter


def run(
    model_spec: str, prompt: str, adapter: str | None, max_new_tokens: int, chat: bool = False
) -> str:
    """Generate greedily and return only the new text.

    Raises:
        ConfigError: `max_new_tokens` below 1, an empty prompt, or a model that cannot
            generate (an encoder).
    """
    from edgetune import models

    if max_new_tokens < 1:
        raise ConfigError(
            f"--max-new-tokens: expected an integer >= 1, got {max_new_tokens}; pass e.g. "
            f"--max-new-tokens 48"
        )
    if not prompt.strip():
        raise ConfigError("--prompt is empty; pass the text to continue, e.g. --prompt 'Once'")

    model, tokenizer = models.load(model_spec)
    if not model.can_generate():
        raise ConfigError(
            f"--model {model_spec} is a {type(model).__name__}, which cannot generate text; "
            f"pass a causal LM (see `edgetune models`)"
        )
    model = load_adapter(model, adapter)
    if chat and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
