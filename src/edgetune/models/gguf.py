"""GGUF files as Hugging Face models.

transformers can read a GGUF file (`gguf_file=`), dequantizing its weights to fp32, but
that takes ~20 s for SmolLM2-135M and the result refuses `save_pretrained`. So a GGUF
model is converted once into an fp32 Hugging Face folder in the cache, keyed by the file's
size and mtime; later loads read that folder in well under a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from edgetune.paths import cache_dir


def cached_folder_for(gguf_path: Path, name: str | None = None) -> Path:
    """The cache folder that holds (or will hold) the fp32 conversion of `gguf_path`."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return cache_dir() / "models" / f"{name or gguf_path.stem}-{digest}"


def convert_gguf(gguf_path: Path, name: str | None = None) -> Path:
    """Dequantize a GGUF file into an fp32 Hugging Face folder, once.

    Args:
        gguf_path: the `.gguf` file.
        name: a readable prefix for the cache folder.

    Returns:
        The folder (config.json, model.safetensors, tokenizer files).
    """
    target = cached_folder_for(gguf_path, name)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # The weights are plain fp32 tensors now; drop the GGUF quantizer marker so the model
    # saves like any other.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    # Write to a temporary sibling and rename, so an interrupted conversion never leaves
    # a half-written folder that looks complete.
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
