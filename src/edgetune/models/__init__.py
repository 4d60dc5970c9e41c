"""Models: load any Hugging Face causal LM (folder, .gguf file, hub id, built-in name)."""

from edgetune.models.builtin import BUILTIN_MODELS
from edgetune.models.loader import list_models, load, resolve
from edgetune.models.tiny import tiny_llama

__all__ = ["BUILTIN_MODELS", "list_models", "load", "resolve", "tiny_llama"]
