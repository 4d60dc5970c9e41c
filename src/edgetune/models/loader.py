"""Load any causal LM (or the built-in encoder) with its tokenizer.

A spec is tried, in order, as: a built-in name (`edgetune models`), a local Hugging Face
folder, a local `.gguf` file, and a Hugging Face hub id (for users who are online). When
nothing matches, the error lists every attempt and why it failed. Models load in fp32
(bf16 is ~20x slower on these CPUs) and in eval mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgetune.errors import ModelNotFoundError
from edgetune.models.builtin import BUILTIN_MODELS
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
            return convert_gguf(ggufs[0]), "causal-lm"
        tried.append(f"local folder {path} (no config.json and not exactly one .gguf file)")
    elif path.suffix == ".gguf":
        if path.is_file():
            return convert_gguf(path), "causal-lm"
        tried.append(f"GGUF file {path} (does not exist)")
    else:
        tried.append(f"local path {path} (does not exist)")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        if _hub_reachable():
            return spec, "causal-lm"
        tried.append(f"Hugging Face hub id {spec!r} (huggingface.co is unreachable from here)")
    raise ModelNotFoundError(_not_found(spec, tried))


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
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except OSError as exc:
        if isinstance(source, str):
            raise ModelNotFoundError(
                _not_found(spec, [f"Hugging Face hub id {spec!r}: {exc}".splitlines()[0]])
                + "\nThe hub needs internet access; offline, use a local folder or .gguf file."
            ) from exc
        raise ModelNotFoundError(f"cannot load model from {source}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.eval(), tokenizer


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
