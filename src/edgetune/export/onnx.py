"""ONNX export (torch.onnx's dynamo exporter) and an ONNX Runtime session.

The graph is `edgetune.export.graph`'s: adapter tensors as named inputs with a leading
copy axis, or a plain / merged model. Copies, batch and sequence length are dynamic
dimensions, so one file serves inference (C = 1), a MeZO forward and a P-RGE step
(C = 2q) at any batch size. Weights are stored in the .onnx file itself (a 135M-parameter
model is well under protobuf's 2 GB limit).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetune.errors import ConfigError

OPSET = 18
EXTRA_HINT = "pip install 'edgetune[export]' (or make setup-export)"


def _dynamic_shapes(module: Any, num_args: int) -> dict[str, Any]:
    from torch.export import Dim

    if num_args == 2:  # plain graph: [b, T]
        batch, seq = Dim("batch"), Dim("seq")
        row = {0: batch, 1: seq}
        return {"input_ids": row, "attention_mask": row}
    copies, batch, seq = Dim("copies"), Dim("batch"), Dim("seq")
    row = {0: copies, 1: batch, 2: seq}
    return {
        "input_ids": row,
        "attention_mask": row,
        "adapter": tuple({0: copies} for _ in range(num_args - 2)),
    }


def export_onnx(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path) -> None:
    """Export `module` (an AdapterInputLM or PlainLM) called on `args` to `path`.

    Raises:
        ConfigError: onnx / onnxscript are not installed, or the exporter fails (the
            message carries its first line).
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError(f"ONNX export needs onnx and onnxscript: {EXTRA_HINT}") from None
    try:
        with warnings.catch_warnings():
            # the exporter's warnings (unused axis names, deprecations) are its internals
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=True,
                input_names=module.input_names(),  # type: ignore[operator]
                output_names=["logits"],
                dynamic_shapes=_dynamic_shapes(module, len(args)),
                opset_version=OPSET,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; keep its first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"torch.onnx could not export this model ({first}); supported are Llama-family "
            "causal LMs (e.g. SmolLM2, stories260K) with LoRA on their linear layers"
        ) from exc


class OrtSession:
    """An ONNX Runtime CPU session that takes positional numpy inputs, returns logits."""

    def __init__(self, path: Path, threads: int = 1):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(f"ONNX Runtime is not installed: {EXTRA_HINT}") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ConfigError(
                f"ONNX Runtime cannot load {path} ({str(exc).strip().splitlines()[0]}); the "
                "file is damaged or truncated: export it again with edgetune export"
            ) from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """Run the graph on inputs given in `input_names` order; returns the logits."""
        feeds = dict(zip(self.input_names, inputs, strict=True))
        return self.session.run(["logits"], feeds)[0]
