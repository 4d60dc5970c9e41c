"""Multi-copy LoRA: run C versions of a LoRA adapter side by side in one forward pass.

P-RGE (Gao et al., "Enabling Resource-Efficient On-Device Fine-Tuning of LLMs Using Only
Inference Engines", 2024) evaluates 2q perturbed adapters in one batched pass. The input
batch is repeated C times along the batch axis; slice c (rows c*b .. (c+1)*b-1) goes
through copy c of the adapter:

    y[c] = x[c] W^T + s * (x[c] A_c^T) B_c^T        x[c]: [b*T, in], A_c: [r, in], B_c: [out, r]

computed as one batched matmul over the copy axis: (x A^T) is [C, b*T, r] and the stacked
B copies are [C, out, r]. When A is frozen (LoRA-FA) it is shared and x A^T is one
ordinary matmul. The frozen base projection x W^T is computed once for all rows, as in
any batched inference.

This is built on the Hugging Face PEFT LoRA model rather than beside it: while copies are
active the PEFT adapter is disabled (its layers compute only x W^T) and a forward hook on
each LoRA layer adds the multi-copy term. The adapter's own tensors stay the single
source of truth (the "master" copy that updates are applied to), so saving, loading and
the parameter order used to draw ZO directions are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from edgetune.errors import ConfigError


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The PEFT LoRA layers of `model`, in module order."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def _hook(copies: dict[int, torch.Tensor], num_copies: int) -> Any:
    def add_lora(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        a = module.lora_A["default"].weight  # type: ignore[index]
        b = module.lora_B["default"].weight  # type: ignore[index]
        a_copies, b_copies = copies.get(id(a)), copies.get(id(b))
        xs = x.reshape(num_copies, -1, x.shape[-1])  # [C, b*T, in]
        xa = xs @ a.t() if a_copies is None else torch.bmm(xs, a_copies.transpose(1, 2))
        # [C, b*T, out]: each copy's B applied to its own slice
        yb = xa @ b.t() if b_copies is None else torch.bmm(xa, b_copies.transpose(1, 2))
        scale = module.scaling["default"]  # type: ignore[index]
        return output + scale * yb.reshape(output.shape)

    return add_lora


@contextmanager
def multi_copy(
    model: torch.nn.Module, copies: dict[int, torch.Tensor], num_copies: int
) -> Iterator[None]:
    """Within the block, `model` runs `num_copies` adapter versions on a repeated batch.

    Args:
        model: a PEFT LoRA model.
        copies: id(adapter tensor) -> its stacked copies [C, *shape]; tensors not in the
            mapping (e.g. LoRA-FA's frozen A) are shared by every copy.
        num_copies: C; the batch given to the model must have C * b rows.
    """
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("P-RGE needs a LoRA adapter: use --peft lora or --peft lora-fa")
    for tensors in copies.values():
        if tensors.shape[0] != num_copies:
            raise ValueError(f"copies have {tensors.shape[0]} rows, expected {num_copies}")
    hook = _hook(copies, num_copies)
    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with model.disable_adapter():  # type: ignore[operator]
            yield
    finally:
        for handle in handles:
            handle.remove()


def repeat_batch(batch: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    """Repeat every tensor of a batch `times` times along the batch axis (copy-major)."""
    return {k: v.repeat(times, *([1] * (v.dim() - 1))) for k, v in batch.items()}
