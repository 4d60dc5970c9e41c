"""`edgetune generate`: greedy continuation of a prompt (optionally with an adapter)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgetune import threads
from edgetune.config import option
from edgetune.errors import ConfigError
from edgetune.recipes.evaluate import load_adapter


@dataclass
class GenerateConfig:
    """Everything `edgetune generate` needs."""

    model: str = option(
        "smollm2-135m", "built-in name, HF folder, .gguf file or hub id", flag="--model"
    )
    adapter: str = option(
        "", "PEFT adapter folder trained on --model ('' = none)", flag="--adapter"
    )
    prompt: str = option("", "the text to continue", flag="--prompt")
    max_new_tokens: int = option(48, "tokens to generate (greedy)", flag="--max-new-tokens")
    chat: bool = option(False, "wrap the prompt in the model's chat template", flag="--chat")
    threads: int = option(0, "threads (0 = chosen at start from the free cores)")

    def __post_init__(self) -> None:
        threads.check(self.threads, "threads")
        if self.max_new_tokens < 1:
            raise ConfigError(
                f"max_new_tokens: expected an integer >= 1, got {self.max_new_tokens}; pass "
                "e.g. --max-new-tokens 48"
            )
        if not self.prompt.strip():
            raise ConfigError("prompt is empty; pass the text to continue, e.g. --prompt 'Once'")


def run(cfg: GenerateConfig) -> str:
    """Generate greedily and return only the new text.

    Raises:
        ConfigError: a model that cannot generate (an encoder), or an adapter of another
            model.
    """
    from edgetune import models

    model_spec, prompt, adapter = cfg.model, cfg.prompt, cfg.adapter or None
    max_new_tokens, chat = cfg.max_new_tokens, cfg.chat

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
