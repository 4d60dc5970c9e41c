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
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is damaged ({exc}); export the model again") from None
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
