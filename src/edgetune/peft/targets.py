"""Which layers LoRA wraps by default, per architecture family.

Each family names its projections differently, so one default list cannot serve all of
them (HF PEFT keeps a table by `model_type` for the same reason). edgetune's default is
every attention and MLP projection of a block, which is what the LoRA and QLoRA papers
found best at a fixed parameter budget:

  llama, mistral, qwen2, qwen3, gemma3   q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
  phi3                                   qkv_proj o_proj gate_up_proj down_proj (fused)
  gpt2                                   c_attn c_proj c_fc (transformers' Conv1D)
  opt                                    q_proj k_proj v_proj out_proj fc1 fc2

GPT-2 stores its projections as `Conv1D`, a linear layer whose weight is [in, out], the
transpose of `nn.Linear`'s. PEFT wraps it with `fan_in_fan_out=True`, so its A is still
[r, in] and its B [out, r] and the adapter math (`x A^T B^T`) is unchanged; only a merge
into the base weight needs the transpose (`W += s (B A)^T`).

A family missing from the table gets no guess: `default_targets` refuses and lists the
model's linear layers so the user can name them in `peft.target_modules`.
"""

from __future__ import annotations

import torch

from edgetune.compress.quantize import Int8Linear
from edgetune.errors import ConfigError

_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "gemma3_text": _LLAMA_STYLE,  # Gemma 3's text-only causal LM (270M, 1B)
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}


def model_type(model: torch.nn.Module) -> str | None:
    """The `config.model_type` of a Hugging Face model (or of the model a PEFT model
    wraps); None when it has no config."""
    return getattr(getattr(model, "config", None), "model_type", None)


def is_conv1d(module: torch.nn.Module) -> bool:
    """Whether `module` is transformers' `Conv1D` (GPT-2's linear layer, weight [in, out])."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def is_adaptable(module: torch.nn.Module) -> bool:
    """A layer LoRA can wrap: `nn.Linear`, edgetune's weight-only int8 linear, or
    transformers' `Conv1D`."""
    return isinstance(module, torch.nn.Linear | Int8Linear) or is_conv1d(module)


def adaptable_names(model: torch.nn.Module) -> list[str]:
    """The distinct leaf names of the model's adaptable layers, sorted."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_adaptable(m)})


def default_targets(model: torch.nn.Module) -> list[str]:
    """The layers LoRA wraps when `peft.target_modules` is left empty.

    Raises:
        ConfigError: the model's family has no default here (names its linear layers).
    """
    kind = model_type(model)
    if kind not in DEFAULT_TARGETS:
        raise ConfigError(
            f"peft.target_modules: edgetune has no default LoRA targets for model_type "
            f"{kind!r} (it knows {', '.join(DEFAULT_TARGETS)}); name them, e.g. "
            f"peft.target_modules=[...] from this model's linear layers {adaptable_names(model)}"
        )
    return list(DEFAULT_TARGETS[kind])
