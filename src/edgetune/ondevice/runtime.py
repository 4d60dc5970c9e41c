"""An exported graph run by its runtime, presented as the causal LM edgetune's tasks call.

A task asks `model(input_ids=..., attention_mask=..., logits_to_keep=...)` for `.logits`;
`RuntimeLM` answers that from an ONNX Runtime or ExecuTorch session, feeding the current
adapter tensors as graph inputs. So task losses, evaluation, the ZO estimators and the
training loop are the very code PyTorch training runs: only the forward pass changes
hands. Inside `copies(...)` a call evaluates C adapter versions on a batch repeated C
times (P-RGE), as one runtime call with the copy axis leading every input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np
import torch

from edgetune.errors import ConfigError
from edgetune.export.manifest import ExportManifest

RUNTIMES = {"ort": "onnx", "executorch": "executorch"}  # runtime -> export format


class Session(Protocol):
    """A loaded graph: positional numpy inputs in, logits out."""

    def run(self, inputs: list[np.ndarray]) -> np.ndarray: ...


def _ort(path: Path, threads: int) -> Session:
    from edgetune.export.onnx import OrtSession

    return OrtSession(path, threads)


def _executorch(path: Path, threads: int) -> Session:
    from edgetune.export.executorch import ExecuTorchSession

    return ExecuTorchSession(path, threads)


SESSIONS = {"onnx": _ort, "executorch": _executorch}  # export format -> its runtime session


def open_session(fmt: str, path: Path, threads: int = 1) -> Session:
    """The runtime session for an exported file of format `fmt` (a key of SESSIONS).

    Raises:
        ConfigError: no runtime runs that format (a GGUF is run by llama.cpp).
    """
    if fmt not in SESSIONS:
        raise ConfigError(
            f"no runtime session for format {fmt!r}; use one of {', '.join(SESSIONS)}"
        )
    return SESSIONS[fmt](path, threads)


class RuntimeLM:
    """The runtime behind the `model(...)` call tasks make (eval mode only).

    Args:
        session: the loaded graph.
        manifest: its export.json (logits mode, LoRA slots).
        tensors: A and B of every slot, in slot order (the adapter's current values;
            they are read at every call, so in-place updates act at once).
    """

    training = False

    def __init__(self, session: Session, manifest: ExportManifest, tensors: list[torch.Tensor]):
        self.session, self.manifest, self.tensors = session, manifest, tensors
        self._copies: list[torch.Tensor] | None = None

    def eval(self) -> RuntimeLM:
        return self

    def train(self, mode: bool = True) -> RuntimeLM:
        if mode:
            raise ConfigError("an exported graph has no backward: train it with zo or prge")
        return self

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int = 0,
        **unused: Any,
    ) -> SimpleNamespace:
        if self.manifest.logits == "last" and logits_to_keep != 1:
            raise ConfigError(
                "this graph returns only the last position's logits (exported with --logits "
                "last), enough for classification; this task reads every position: export "
                "again with --logits all"
            )
        adapter = (
            self._copies if self._copies is not None else [t.unsqueeze(0) for t in self.tensors]
        )
        copies = adapter[0].shape[0] if adapter else 1
        rows, length = input_ids.shape
        shape = (copies, rows // copies, length) if self.manifest.slots else (rows, length)
        inputs = [
            input_ids.reshape(shape).numpy(),
            attention_mask.reshape(shape).numpy(),
            *(np.ascontiguousarray(t.numpy()) for t in adapter),
        ]
        logits = torch.from_numpy(self.session.run(inputs))
        logits = logits.reshape(rows, logits.shape[-2], logits.shape[-1])
        if logits_to_keep == 1 and logits.shape[1] != 1:
            logits = logits[:, -1:, :]
        return SimpleNamespace(logits=logits)

    @contextmanager
    def copies(self, copies: dict[int, torch.Tensor], num_copies: int) -> Iterator[None]:
        """Within the block a call runs `num_copies` adapters on a batch of num_copies * b
        rows (copy-major). `copies` maps id(tensor) -> [C, *shape]; tensors not in it
        (LoRA-FA's frozen A) are shared by every copy."""
        self._copies = [
            copies[id(t)] if id(t) in copies else t.unsqueeze(0).expand(num_copies, *t.shape)
            for t in self.tensors
        ]
        try:
            yield
        finally:
            self._copies = None
