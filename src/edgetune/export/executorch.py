"""ExecuTorch export of the edgetune graph (.pte, XNNPACK-lowered) and a session that runs it.

`export_pte` takes the adapter-as-input graph of `export/graph.py` (or a merged model) through
torch.export -> `to_edge_transform_and_lower` (XnnpackPartitioner) -> `.pte`, with static
shapes: the copy, batch and sequence axes are exactly the limits (`PteLimits`), and the
session pads smaller inputs up to them (zero adapter copies, masked rows, left-padded
tokens) and cuts the logits back. Static, because torch.export with bounded dynamic axes
did not finish lowering SmolLM2-135M in 40 minutes here (symbolic-shape simplification),
while static shapes take about 3 minutes and run as fast. The price: a call costs what a
call at the limits costs, so export with the limits a run uses (MeZO: --max-copies 1;
P-RGE: 2q; --max-batch the batch size; --max-seq the task's max_length). An input past a
limit is refused at run time.

XNNPACK takes the linears whose weight is a static parameter (every base projection and the
head) and the batched matmuls, including the rank-r LoRA branch x A^T B^T whose A and B are
inputs; what it does not take (views, masks, RMSNorm's mean) runs on ExecuTorch's portable
kernels. `export_pte` counts both so the metadata says how much was delegated.

`ExecuTorchSession` runs the `.pte` through `executorch.runtime`. Its `threads` sets the size
of ExecuTorch's threadpool, which XNNPACK runs on; that pool is one per process, so the last
session created decides it for all.
"""

from __future__ import annotations

import operator
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from edgetune.errors import ConfigError

INSTALL_HINT = "ExecuTorch is not installed: pip install 'edgetune[export]'"

# The token inputs' axes, per graph kind, and the export flag that raises each bound.
_ADAPTER_AXES = ("copies", "batch", "seq")
_MERGED_AXES = ("batch", "seq")
_FLAGS = {"copies": "--max-copies", "batch": "--max-batch", "seq": "--max-seq"}
_DTYPES = {4: np.int64, 6: np.float32}  # ExecuTorch ScalarType codes: Long, Float


@dataclass
class PteLimits:
    """The shape the program is built for (smaller inputs are padded up to it).

    Attributes:
        copies: most adapter copies C in one call (P-RGE needs 2q).
        batch: most rows b per copy.
        seq: most tokens T per row.
    """

    copies: int = 1
    batch: int = 16
    seq: int = 128

    def __post_init__(self) -> None:
        for axis in _ADAPTER_AXES:
            value = getattr(self, axis)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{_FLAGS[axis]}={value!r}: expected an integer >= 1")


def export_pte(
    module: torch.nn.Module,
    example_args: tuple[torch.Tensor, ...],
    path: Path,
    limits: PteLimits,
    adapter_inputs: bool,
    xnnpack: bool = True,
) -> dict:
    """Export `module` to an ExecuTorch program at `path` (written atomically).

    Args:
        module: an `AdapterInputLM` (`adapter_inputs=True`; args = ids, mask, then A/B of
            every slot, all with the copy axis first) or a `graph.PlainLM`
            (`adapter_inputs=False`; args = ids, mask [b, T]).
        example_args: inputs to trace with; repeated or cut to the limits' shapes.
        path: the .pte to write.
        limits: upper bounds of the copy, batch and sequence axes.
        adapter_inputs: which of the two graphs `module` is.
        xnnpack: lower to XNNPACK; False leaves every op to the portable kernels.

    Returns:
        Facts for the metadata: delegated_nodes and portable_nodes (ops XNNPACK took vs ops
        left to portable kernels), portable_ops (the latter by op), planned_mb (activation
        memory planned for the limits, taken when the .pte loads), xnnpack, limits.

    Raises:
        ConfigError: ExecuTorch is not installed, or the example args do not fit the graph.
    """
    axes = _ADAPTER_AXES if adapter_inputs else _MERGED_AXES
    n_expected = len(example_args) if adapter_inputs else 2
    if len(example_args) != n_expected or example_args[0].dim() != len(axes):
        raise ConfigError(
            f"export_pte(adapter_inputs={adapter_inputs}) expects input_ids of {len(axes)} "
            f"axes ({', '.join(axes)}); got {len(example_args)} inputs, input_ids of shape "
            f"{tuple(example_args[0].shape)}"
        )
    _require_executorch()
    from executorch.exir import to_edge_transform_and_lower

    args = _static_examples(example_args, axes, limits)
    with torch.no_grad():
        exported = torch.export.export(module.eval(), args, strict=False)
        partitioners = []
        if xnnpack:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
                XnnpackPartitioner,
            )

            partitioners.append(XnnpackPartitioner())
        edge = to_edge_transform_and_lower(exported, partitioner=partitioners)
    counts = _delegation_counts(edge.exported_program().graph_module)
    program = edge.to_executorch()
    _write_atomic(Path(path), program.buffer)
    # Activations are planned for the limits: this much memory is taken when the .pte loads.
    planned = sum(program.executorch_program.execution_plan[0].non_const_buffer_sizes)
    return {
        **counts,
        "planned_mb": round(planned / 2**20, 1),
        "xnnpack": xnnpack,
        "limits": asdict(limits),
    }


def _static_examples(
    example_args: Sequence[torch.Tensor], axes: Sequence[str], limits: PteLimits
) -> tuple[torch.Tensor, ...]:
    """Example args at exactly the limits (the shapes the program is built for)."""
    sizes = {i: getattr(limits, axis) for i, axis in enumerate(axes)}
    ids, mask = (_fit(t, sizes) for t in example_args[:2])
    adapter = tuple(_fit(t, {0: sizes[0]}) for t in example_args[2:]) if len(axes) == 3 else ()
    return (ids, mask, *adapter)


def _fit(t: torch.Tensor, sizes: dict[int, int]) -> torch.Tensor:
    """`t` repeated or cut along each axis in `sizes` to that length."""
    for axis, n in sizes.items():
        if t.shape[axis] < n:
            reps = [1] * t.dim()
            reps[axis] = -(-n // t.shape[axis])
            t = t.repeat(*reps)
        t = t.narrow(axis, 0, n)
    return t.contiguous()


def _delegation_counts(graph_module: torch.fx.GraphModule) -> dict:
    """Ops inside XNNPACK subgraphs vs ops left in the top-level graph (portable kernels).

    Tuple unpacking (`getitem`) and shape arithmetic on symbolic sizes are not kernels and
    are not counted."""
    delegated = 0
    portable: Counter[str] = Counter()
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and node.name.startswith("lowered_module_"):
            lowered = getattr(graph_module, node.target)
            delegated += sum(
                1 for n in lowered.original_module.graph.nodes if n.op == "call_function"
            )
        elif node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            if "executorch_call_delegate" in name or node.target is operator.getitem:
                continue
            if isinstance(node.meta.get("val"), (int, torch.SymInt)):
                continue
            portable[name] += 1
    return {
        "delegated_nodes": delegated,
        "portable_nodes": sum(portable.values()),
        "portable_ops": dict(sorted(portable.items())),
    }


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, then rename, so no reader sees half a .pte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pad(x: np.ndarray, shape: Sequence[int], seq_axis: int | None) -> np.ndarray:
    """`x` zero-padded to `shape`: at the end of every axis, except the token inputs'
    sequence axis, padded at the start (left padding: the real tokens stay last and keep
    their relative positions; the mask's zeros hide the pad)."""
    if tuple(x.shape) == tuple(shape):
        return x
    pads = [(0, n - m) for m, n in zip(x.shape, shape, strict=True)]
    if seq_axis is not None:
        pads[seq_axis] = pads[seq_axis][::-1]
    return np.pad(x, pads)


def _require_executorch() -> None:
    try:
        import executorch.exir  # noqa: F401
    except ImportError as err:
        raise ConfigError(INSTALL_HINT) from err


class ExecuTorchSession:
    """Runs an exported `.pte` (method `forward`) on the ExecuTorch runtime.

    Args:
        path: the .pte file.
        threads: size of ExecuTorch's threadpool, which XNNPACK runs on (portable kernels
            are single-threaded). ExecuTorch starts it at the core count; the pool is one per
            process, so this resets it for every session in the process.

    Raises:
        ConfigError: ExecuTorch is not installed, or `path` is missing, truncated or not an
            ExecuTorch program.
    """

    def __init__(self, path: Path, threads: int = 1):
        try:
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime
        except ImportError as err:
            raise ConfigError(INSTALL_HINT) from err
        if threads < 1:
            raise ConfigError(f"threads={threads}: expected an integer >= 1")
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"ExecuTorch program {self.path} does not exist; export it first")
        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
        self.threads = threads
        try:
            program = Runtime.get().load_program(self.path)
            self._method = program.load_method("forward")
            meta = program.metadata("forward")
        except RuntimeError as err:
            raise ConfigError(
                f"{self.path} is not a loadable ExecuTorch program (truncated or corrupt: "
                f"{err}); export it again"
            ) from err
        infos = [meta.input_tensor_meta(i) for i in range(meta.num_inputs())]
        self.max_shapes = [tuple(info.sizes()) for info in infos]
        self._dtypes = [_DTYPES.get(info.dtype(), np.float32) for info in infos]
        self.axes = _ADAPTER_AXES if len(self.max_shapes[0]) == 3 else _MERGED_AXES

    def run(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """Positional inputs (in the graph's `input_names` order) -> logits.

        Inputs are cast to the program's dtypes (int64 tokens and mask, fp32 A/B).

        Raises:
            ConfigError: wrong number of inputs, a shape the program was not exported for,
                or an axis past its export limit (the message names the flag to raise it).
        """
        if len(inputs) != len(self.max_shapes):
            raise ConfigError(f"{self.path} takes {len(self.max_shapes)} inputs; got {len(inputs)}")
        given = inputs[0].shape
        tensors = []
        for i, (x, bound, dtype) in enumerate(
            zip(inputs, self.max_shapes, self._dtypes, strict=True)
        ):
            x = np.ascontiguousarray(x, dtype=dtype)
            self._check_shape(i, x.shape, bound)
            tensors.append(
                torch.from_numpy(_pad(x, bound, seq_axis=len(bound) - 1 if i < 2 else None))
            )
        out = self._method.execute(tensors)[0].numpy()
        lead = tuple(slice(0, n) for n in given[:-1])  # copies and/or batch
        out = out[lead]
        if out.shape[-2] != 1:  # every position's logits: the real tokens are the last T
            out = out[..., out.shape[-2] - given[-1] :, :]
        return np.ascontiguousarray(out)

    def _check_shape(self, index: int, shape: tuple[int, ...], bound: tuple[int, ...]) -> None:
        if len(shape) != len(bound):
            raise ConfigError(
                f"input {index} of {self.path} has {len(shape)} axes; expected {len(bound)}"
            )
        # Token inputs carry every bounded axis; A/B copies only the copy axis, first.
        if index < 2:
            bounded = self.axes
        elif self.axes[0] == "copies":
            bounded = self.axes[:1]
        else:
            bounded = ()
        for axis, (size, most) in enumerate(zip(shape, bound, strict=True)):
            if axis < len(bounded) and size > most:
                raise ConfigError(
                    f"{bounded[axis]}={size} is past the limit {most} {self.path} was "
                    f"exported with; export again with {_FLAGS[bounded[axis]]} {size} or more"
                )
            if axis >= len(bounded) and size != most:
                expected = [f"<={n}" if a < len(bounded) else str(n) for a, n in enumerate(bound)]
                raise ConfigError(
                    f"input {index} of {self.path} has shape {shape}; the program takes "
                    f"({', '.join(expected)})"
                )
