"""`export.json`: what an export folder holds, so a runtime can use it without PyTorch.

An export folder is self-describing: the format and its files (with SHA-256 checksums,
so a truncated copy on a device is refused with a clear message instead of a runtime's
low-level error), the base model it came from, whether the graph takes the adapter as
inputs and with which LoRA slots (module, shape, scaling), the logits it returns, the
PEFT config to write a trained adapter back in PEFT's format, and the tokenizer folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgetune.errors import ConfigError
from edgetune.export.graph import LoraSlot

MANIFEST = "export.json"


@dataclass
class ExportManifest:
    """The contents of `export.json`.

    Attributes:
        format: onnx | executorch | gguf.
        files: role -> file name in the folder ("graph", "model", "adapter").
        base_model: the model spec the export was made from.
        logits: "last" or "all" (onnx / executorch), "" for gguf.
        slots: the LoRA slots taken as graph inputs (empty: no adapter inputs).
        peft_config: adapter_config.json of the slots' LoRA (None without slots).
        merged_adapter: the adapter folded into the weights, if any.
        adapter: the folder (in the export) holding the adapter the slots start from.
        checksums: file name -> SHA-256 of every file listed in `files`.
        facts: format-specific figures (parity with PyTorch, sizes, delegation, limits).
    """

    format: str
    files: dict[str, str]
    base_model: str
    logits: str = ""
    slots: list[LoraSlot] = field(default_factory=list)
    peft_config: dict[str, Any] | None = None
    merged_adapter: str | None = None
    adapter: str | None = None
    checksums: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def adapter_inputs(self) -> bool:
        """Whether the graph takes the LoRA tensors as inputs."""
        return bool(self.slots)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 8 MB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: ExportManifest) -> None:
    """Checksum the listed files and write `folder/export.json`."""
    manifest.checksums = {name: sha256(folder / name) for name in manifest.files.values()}
    data = asdict(manifest)
    (folder / MANIFEST).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_manifest(folder: Path, verify: bool = True) -> ExportManifest:
    """Read and (with `verify`) check an export folder.

    Raises:
        ConfigError: not an export folder, a damaged export.json, or a file missing or
            not matching its checksum (truncated or corrupt).
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ConfigError(
            f"{folder} is not an edgetune export folder (no {MANIFEST}); create one with "
            "edgetune export --model M --format onnx|executorch|gguf --out DIR"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["slots"] = [LoraSlot(**s) for s in data.get("slots", [])]
        manifest = ExportManifest(**data)
    except (ValueError, TypeError, AttributeError) as exc:  # not an object, a slot not one
        raise ConfigError(f"{path} is damaged ({exc}); export the model again") from None
    problem = _type_problem(manifest) or _rank_problem(manifest)
    if problem:
        raise ConfigError(
            f"{path} is damaged or was edited by hand ({problem}); export the model again "
            "(edgetune export writes it, and the graph's shapes are fixed at export)"
        )
    if verify:
        for name, want in manifest.checksums.items():
            file = Path(folder) / name
            if not file.is_file():
                raise ConfigError(f"{file} is missing from the export; export the model again")
            if sha256(file) != want:
                raise ConfigError(
                    f"{file} does not match its checksum in {MANIFEST}: the file is truncated "
                    "or corrupt (an interrupted copy is a common cause); copy or export it again"
                )
    return manifest


# The type of every field (and of a slot's), as `export.json` stores it.
FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "files": dict,
    "base_model": str,
    "logits": str,
    "slots": list,
    "peft_config": (dict, type(None)),
    "merged_adapter": (str, type(None)),
    "adapter": (str, type(None)),
    "checksums": dict,
    "facts": dict,
}
SLOT_TYPES = {"module": str, "in_features": int, "out_features": int, "rank": int}


def _type_problem(manifest: ExportManifest) -> str:
    """The first field (or slot field) of the wrong type, as a phrase ("" if none)."""
    for name, kind in FIELD_TYPES.items():
        value = getattr(manifest, name)
        if not isinstance(value, kind):
            return f"{name} is {value!r}, not a {_kind_name(kind)}"
    files = {**manifest.files, **manifest.checksums}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return "files and checksums must map names to strings"
    if manifest.format != "gguf" and "graph" not in manifest.files:
        return f"files names no graph: {manifest.files!r}"
    for slot in manifest.slots:
        for name, kind in SLOT_TYPES.items():
            value = getattr(slot, name)
            if type(value) is not kind or (kind is int and value < 1):
                return f"slot {slot.module!r} has {name}={value!r}"
    return ""


def _rank_problem(manifest: ExportManifest) -> str:
    """A slot whose rank differs from the LoRA config exported beside it ("" if none):
    the graph's inputs have the config's rank, so the runtime would refuse every call."""
    config = manifest.peft_config or {}
    r = config.get("r")
    pattern = config.get("rank_pattern") or {}
    for slot in manifest.slots:
        want = next((v for k, v in pattern.items() if slot.module.endswith(k)), r)
        if isinstance(want, int) and slot.rank != want:
            return f"slot {slot.module} has rank {slot.rank}, peft_config.r is {want}"
    return ""


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "string", dict: "mapping", list: "list", type(None): "null"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
