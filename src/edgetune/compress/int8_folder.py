"""The int8 model folder: how a model quantized by `quantize_int8` is saved and loaded.

Layout of DIR (a Hugging Face folder with a different weights file):
- `config.json`: the model's own config plus one key of ours,
  `"edgetune_int8": {"format": 1, "modules": [...], "keep_fp32": [...]}`, listing the
  module paths that are `Int8Linear` and the module names kept in fp32 (`lm_head`).
- `model.int8.safetensors`: every tensor of the model once. A quantized module `M`
  contributes `M.weight_int8` (int8, (out, in)), `M.scale` (fp32, (out,)) and `M.bias`
  if it has one; everything else (embedding, norms, an untied `lm_head`) is fp32 under its
  usual name. A tied `lm_head` is not written: it is the embedding.
- the tokenizer files, as `save_pretrained` writes them.

Why this shape: the weights file is deliberately not named `model.safetensors`, so stock
`AutoModelForCausalLM.from_pretrained(DIR)` stops with "no file named model.safetensors"
instead of silently filling the missing `*.weight` tensors with random values.
`edgetune.models.load(DIR)` recognizes the `edgetune_int8` key and calls `load_int8`,
which builds the model on the meta device, swaps in `Int8Linear` shells and assigns the
file's tensors, so no fp32 copy of a quantized layer ever exists in memory.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetune.compress.quantize import KEEP_FP32, Int8Linear
from edgetune.errors import EdgetuneError

CONFIG_KEY = "edgetune_int8"
WEIGHTS_FILE = "model.int8.safetensors"
FORMAT = 1


def save_int8(model: nn.Module, folder: Path | str) -> Path:
    """Write a model holding `Int8Linear` layers as an int8 folder (weights + config).

    Args:
        model: a plain causal LM after `quantize_int8` (merge any LoRA first).
        folder: where to write; created if missing.

    Returns:
        The weights file written.

    Raises:
        EdgetuneError: the model has no `Int8Linear` layer or still carries LoRA layers.
    """
    from safetensors.torch import save_file

    modules = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    if not modules:
        raise EdgetuneError("save_int8: the model has no int8 layer; call quantize_int8 first")
    if any("lora_A" in n for n, _ in model.named_modules()):
        raise EdgetuneError("save_int8: the model carries LoRA layers; merge them first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous() for name, t in _unique_tensors(model).items()}
    path = folder / WEIGHTS_FILE
    save_file(state, str(path), metadata={"format": "pt", CONFIG_KEY: str(FORMAT)})
    model.config.save_pretrained(folder)  # the usual config.json, then our entry in it
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config[CONFIG_KEY] = {"format": FORMAT, "modules": modules, "keep_fp32": list(KEEP_FP32)}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    return path


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Persistent parameters and buffers by name, a shared (tied) tensor only once."""
    seen: set[int] = set()
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        state[name] = tensor
    return state


def int8_entry(folder: Path) -> dict[str, Any] | None:
    """The folder's `edgetune_int8` config entry, or None for an ordinary model folder."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    entry = config.get(CONFIG_KEY) if isinstance(config, dict) else None
    return entry if isinstance(entry, dict) else None


def load_int8(folder: Path | str) -> nn.Module:
    """Rebuild a model saved by `save_int8`, in eval mode, without fp32 quantized weights.

    Raises:
        EdgetuneError: an unknown format version, a missing weights file, or a file whose
            tensors do not match the config (the message names the fix).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    entry = int8_entry(folder) or {}
    if entry.get("format") != FORMAT:
        raise EdgetuneError(
            f"{folder}: int8 format {entry.get('format')!r} is not {FORMAT}; save the model "
            "again with this edgetune (edgetune compress --quantize int8)"
        )
    if not (folder / WEIGHTS_FILE).is_file():
        raise EdgetuneError(
            f"{folder} has an int8 config but no {WEIGHTS_FILE}; copy the whole folder"
        )
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _shrink_to_layer_widths(model, config)
    for name in entry["modules"]:
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        shell = Int8Linear.empty(linear.in_features, linear.out_features, linear.bias is not None)
        setattr(model.get_submodule(parent), child, shell)
    state = load_file(str(folder / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [n for n in missing if _on_meta(model, n)]
    if left or unexpected:
        raise EdgetuneError(
            f"{folder}/{WEIGHTS_FILE} does not match its config.json (missing "
            f"{left[:3]}, unexpected {unexpected[:3]}); save the model again"
        )
    _rebuild_meta_buffers(model)
    return model.eval()


def _shrink_to_layer_widths(model: nn.Module, config: Any) -> None:
    """A pruned model with per-layer widths: cut each (meta) layer to its recorded widths,
    so the int8 shells below get the saved shapes."""
    from edgetune.compress.prune import KeptIndices, prune
    from edgetune.compress.prune.structured import per_layer_widths

    widths = per_layer_widths(config)
    if widths:
        mlp = tuple(tuple(range(w["intermediate_size"])) for w in widths)
        kv = tuple(tuple(range(w["num_key_value_heads"])) for w in widths)
        prune(model, KeptIndices(mlp=mlp, kv_groups=kv))


def _on_meta(model: nn.Module, name: str) -> bool:
    """Whether state-dict entry `name` was left unfilled (a tied weight is filled)."""
    module, _, attr = name.rpartition(".")
    tensor = getattr(model.get_submodule(module), attr, None)
    return tensor is None or tensor.is_meta


def _rebuild_meta_buffers(model: nn.Module) -> None:
    """Fill on CPU the non-persistent buffers (rotary frequencies, Gemma 3's embedding
    scale) that are not in the file and so are still on the meta device.

    A module built from the config alone (a rotary embedding) is recreated; any other
    (Gemma 3's scaled embedding, which holds the loaded weight) gets its buffers from the
    model's own initialiser, with its loaded parameters marked so that it leaves them be.
    """
    for name, module in list(model.named_modules()):
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        if not any(True for _ in module.parameters(recurse=False)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, type(module)(config=model.config))
            continue
        for param in module.parameters(recurse=False):
            param._is_hf_initialized = True  # type: ignore[attr-defined]
        for buffer in meta:
            module._buffers[buffer] = torch.empty_like(module._buffers[buffer], device="cpu")
        model._init_weights(module)  # type: ignore[operator]


def release_file_pages(model: nn.Module) -> nn.Module:
    """Copy every tensor still backed by a memory-mapped weights file into process memory.

    A model read from safetensors shares pages with the file while any of its tensors
    lives; after `quantize_int8` the fp32 embedding and norms keep the whole fp32 file's
    mapping counted in the resident size. Copying them out and collecting lets it go.
    """
    with torch.no_grad():
        for tensor in _unique_tensors(model).values():
            if tensor.dtype != torch.int8:
                tensor.data = tensor.data.clone()
    gc.collect()
    return model
