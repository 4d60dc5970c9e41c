"""Load any causal LM (or the built-in encoder) with its tokenizer.

A spec is tried, in order, as: a built-in name (`edgetune models`), a local Hugging Face
folder, a local `.gguf` file, and a Hugging Face hub id (for users who are online). When
nothing matches, the error lists every attempt and why it failed. Models load in fp32
(bf16 is ~20x slower on these CPUs) and in eval mode.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from edgetune.errors import EdgetuneError, ModelNotFoundError
from edgetune.models.builtin import BUILTIN_MODELS, builtin_for_base_model
from edgetune.models.gguf import convert_gguf


def resolve(spec: str) -> tuple[Path | str, str]:
    """Turn a spec into something `from_pretrained` can read.

    Args:
        spec: a built-in name, a folder, a .gguf file or a hub id.

    Returns:
        (folder path or hub id, kind) where kind is "causal-lm" or "encoder".

    Raises:
        ModelNotFoundError: with the list of what was tried.
    """
    tried: list[str] = []
    if spec in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[spec]
        path = builtin.resolve()
        if path.suffix == ".gguf":
            path = convert_gguf(path, name=spec)
        return path, builtin.kind
    tried.append(f"built-in name (known: {', '.join(BUILTIN_MODELS)})")
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").exists():
            return path, "causal-lm"
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _convert_user_gguf(ggufs[0]), "causal-lm"
        tried.append(f"local folder {path} (no config.json and not exactly one .gguf file)")
    elif path.suffix == ".gguf":
        if path.is_file():
            return _convert_user_gguf(path), "causal-lm"
        tried.append(f"GGUF file {path} (does not exist)")
    else:
        tried.append(f"local path {path} (does not exist)")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        if _hub_reachable():
            return spec, "causal-lm"
        tried.append(f"Hugging Face hub id {spec!r} (huggingface.co is unreachable from here)")
    raise ModelNotFoundError(_not_found(spec, tried))


def _convert_user_gguf(path: Path) -> Path:
    """`convert_gguf` of a user's file, whose reader fails with low-level errors on a
    truncated or foreign file (struct.error on a short header, ValueError on an
    unsupported architecture)."""
    try:
        return convert_gguf(path)
    except (struct.error, ValueError) as exc:
        raise ModelNotFoundError(
            f"cannot read GGUF file {path} ({exc}); check that it is a "
            f"complete .gguf file of a causal LM (a partial download is a common cause)"
        ) from None


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub answers at all; saves a minute of download retries when offline."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _not_found(spec: str, tried: list[str]) -> str:
    lines = [f"cannot find model {spec!r}; tried:"] + [f"  - {t}" for t in tried]
    lines.append("Pass a built-in name, a Hugging Face folder, a .gguf file or a hub id.")
    return "\n".join(lines)


def load(spec: str, *, num_labels: int | None = None) -> tuple[Any, Any]:
    """Load a model and its tokenizer.

    Args:
        spec: see `resolve`.
        num_labels: for encoder models, the number of classes of the classification head.

    Returns:
        (model in eval mode, fp32; tokenizer with a pad token).

    Raises:
        ModelNotFoundError: the spec matched nothing, or a hub download failed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    source, kind = resolve(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if kind == "encoder":
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels or 2, dtype=torch.float32
            )
        else:
            model = _int8_model(source)
            if model is None:
                model = _load_per_layer_widths(source)
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
            model = _int8_dynamic(model)
    except OSError as exc:
        if isinstance(source, str):
            raise ModelNotFoundError(
                _not_found(spec, [f"Hugging Face hub id {spec!r}: {exc}".splitlines()[0]])
                + "\nThe hub needs internet access; offline, use a local folder or .gguf file."
            ) from exc
        raise ModelNotFoundError(f"cannot load model from {source}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    # Tokenizers saved without a limit report 1e30; the model's positions are the real
    # one, and the tasks check data.max_length against it (`build_task`).
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and context < tokenizer.model_max_length:
        tokenizer.model_max_length = context
    return model.eval(), tokenizer


def _load_per_layer_widths(source: Path | str) -> Any | None:
    """A folder saved by pruning with per-layer widths (config.json has
    `edgetune_layer_widths`, which stock transformers refuses with a size mismatch) loaded
    by the pruning package; None for any other model."""
    if not isinstance(source, Path):
        return None
    config = _recorded_json(source / "config.json")
    if config is None or "edgetune_layer_widths" not in config:
        return None
    from edgetune.compress.prune.structured import load_layer_widths  # imports torch

    return load_layer_widths(source)


def _recorded_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file as a dict, or None when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _int8_model(source: Path | str) -> Any:
    """The model of an int8 folder written by `edgetune compress --quantize int8`, or None
    for any other source (the format is described in `edgetune.compress.int8_folder`)."""
    from edgetune.compress.int8_folder import int8_entry, load_int8

    if isinstance(source, str) or int8_entry(source) is None:
        return None
    return load_int8(source)


def _int8_dynamic(model: Any) -> Any:
    """A model written by `edgetune compress --quantize int8-dynamic` (a smoothed fp32
    model whose config asks for it) with its dynamic int8 linears rebuilt; any other model
    unchanged (`edgetune.compress.int8_dynamic`)."""
    from edgetune.compress.int8_dynamic import requantize_on_load

    return requantize_on_load(model)


def check_adapter_fits(model: Any, adapter: Path) -> None:
    """Refuse a PEFT adapter trained on another model before PEFT loads it (PEFT's own
    error is a size-mismatch line per tensor, a hundred lines for a small model).

    Every LoRA tensor must match the in/out features of the module it adapts, and a soft
    prompt the model's hidden size.

    Raises:
        EdgetuneError: adapter_config.json is damaged, or a tensor does not fit (the
            message names the model the adapter was trained on).
    """
    from safetensors import safe_open

    config = _recorded_config(Path(adapter))
    if config is None:
        raise EdgetuneError(
            f"{adapter}/adapter_config.json is not a JSON object (damaged or not written by "
            f"PEFT); train the adapter again or restore the file"
        )
    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        return  # a legacy .bin adapter: PEFT's own check applies
    modules = dict(model.named_modules())
    with safe_open(weights, "pt") as f:
        for key in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
            problem = _misfit(modules, model.config, key, list(f.get_slice(key).get_shape()))
            if problem:
                base = config.get("base_model_name_or_path") or "BASE"
                raise EdgetuneError(
                    f"adapter {adapter} was trained on a different model: {problem}. Load it "
                    f"with the model it was trained on (pass --model "
                    f"{builtin_for_base_model(base) or base})"
                )


def _misfit(modules: dict[str, Any], config: Any, key: str, shape: list[int]) -> str | None:
    """Why adapter tensor `key` of `shape` does not fit the model (None if it does)."""
    if key.endswith("prompt_embeddings"):
        hidden = getattr(config, "hidden_size", None)
        if hidden is not None and shape[-1] != hidden:
            return f"its soft prompt has width {shape[-1]}, this model's hidden size is {hidden}"
        return None
    path, sep, tail = key.removeprefix("base_model.model.").partition(".lora_")
    if not sep:
        return None
    module = modules.get(path)
    if module is None:
        return f"this model has no module {path!r}"
    want = {"A.weight": ("in_features", 1), "B.weight": ("out_features", 0)}.get(tail)
    if want is None or not hasattr(module, want[0]):
        return None
    size = getattr(module, want[0])
    if shape[want[1]] != size:
        return f"{path} has {want[0]}={size} here but {shape[want[1]]} in the adapter"
    return None


def _recorded_config(adapter: Path) -> dict[str, Any] | None:
    """adapter_config.json as a dict, or None when it is unreadable or not an object."""
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def list_models() -> list[dict[str, Any]]:
    """The built-in models, where each resolves and whether it is available here."""
    rows = []
    for builtin in BUILTIN_MODELS.values():
        try:
            where, available = str(builtin.resolve()), True
        except ModelNotFoundError as exc:
            where, available = str(exc), False
        rows.append(
            {
                "name": builtin.name,
                "kind": builtin.kind,
                "description": builtin.description,
                "source": builtin.source,
                "path": where,
                "available": available,
            }
        )
    return rows
