"""Int8 weight-only quantization of a causal LM's linear layers, for inference and for
training a LoRA over a frozen int8 base (QLoRA-style).

In plain words: every weight row of a linear layer is stored as 8-bit integers plus one
fp32 scale, so `W[o, :] ~= scale[o] * W_int8[o, :]` with
`scale[o] = max_i |W[o, i]| / 127` (symmetric, per output channel). A row of K fp32
weights (4K bytes) becomes K + 4 bytes: about 4x smaller. Activations stay fp32; the
matmul runs on the int8 weights and applies the scale to the output,
`y = (x @ W_int8^T) * scale + bias` (shapes: x (..., K), W_int8 (N, K), scale (N,)).

Design choices:
- One module, `Int8Linear`, serves inference and training. Its int8 weight and scales are
  buffers, not parameters, so they are frozen by construction: no optimizer, PEFT or ZO
  direction ever sees them, and an `Adapter`'s trainable tensors stay the LoRA matrices.
- The forward widens the int8 weight to fp32 one layer at a time, runs the fp32 GEMM and
  scales the output rows, `y = (x @ float(W_int8)^T) * scale` (bf16 activations are
  computed in fp32 and cast back); the widened copy lives only during the call (3.5 MB
  for SmolLM2's largest projection). Not torch's int8 weight-only kernel
  `torch._weight_int8pack_mm`: on an AVX2 CPU (no AVX-512) in torch 2.13 it took 225 ms
  for a 128 x 576 by 576 x 1536 product that fp32 does in 6 ms, and 1.6 ms vs 0.3 ms for
  one row, so SmolLM2 prefill was ~45x slower than fp32. `Int8Linear` supplies the one
  gradient LoRA needs, the gradient to the input, `dL/dx = (dL/dy * scale) @ W_int8`
  (the weight itself gets none).
- Not `torch.ao.quantization.quantize_dynamic`: in torch 2.13 it still runs but warns that
  `torch.ao.quantization` is deprecated (and so are the `qint8` tensors it builds); its
  modules have no backward, so LoRA layers below them would get no gradient; and it also
  quantizes the activations, one scale per tensor, which SmolLM2-135M does not survive:
  on a 25-token story its logits move by up to 79 % of the largest logit and only 8 of 25
  next-token predictions match fp32 (lm_head kept fp32 or not), against 3.8 % and 23 of
  25 for the weight-only int8 here.
- Not torchao (0.18, the suggested replacement; it runs on torch 2.13 with a deprecation
  warning): its int8 weight-only layers were no faster here (SmolLM2 prefill 1.54 s vs
  1.60 s, decode 5.8 vs 4.5 tokens/s, one contended thread; `bench/quantize_kernels.py`)
  and further from fp32 (max logit error 5.1 % vs 4.0 %, top-1 81 % vs 87 % of 128
  positions), and it would be a new dependency.
- LoRA first, quantization second. PEFT 0.21 wraps only the layer types it knows
  (`nn.Linear` and a few quantized backends), so `attach` runs on the fp32 model and
  `quantize_int8` then replaces each `LoraLayer.base_layer` in place; the LoRA matrices
  (`lora_A`, `lora_B`) are skipped and stay fp32 and trainable.
- `lm_head` is kept in fp32 by default: in Llama-family small models it is tied to the
  token embedding, and quantizing it would untie (and duplicate) that matrix.

Usage: `quantize_int8(model)` for inference; `adapter = attach(model, cfg, seed)` then
`quantize_int8(adapter.model)` for a LoRA on an int8 base, trained by the usual
first-order, ZO or P-RGE steppers over `adapter.trainable()`.

Memory note: a model loaded from safetensors keeps its fp32 file memory-mapped while any
tensor from it lives (the fp32 embedding does), so the process's resident size after
quantization still counts those file pages until the remaining tensors are copied out
(`int8_folder.release_file_pages`). A model loaded from an int8 folder
(`int8_folder.load_int8`) never holds the fp32 linear weights at all; a LoRA attaches to it
through `int8_as_linear`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from edgetune.errors import ConfigError

KEEP_FP32 = ("lm_head",)


class Int8Linear(nn.Module):
    """A frozen linear layer with int8 weights and one fp32 scale per output row."""

    weight_int8: torch.Tensor  # (out_features, in_features), int8
    scale: torch.Tensor  # (out_features,), fp32
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        int8 = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_int8", int8)
        self.register_buffer("scale", scale)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool) -> Int8Linear:
        """A shell of the given shape on the meta device, for `load_int8` to fill."""
        meta = nn.Linear(in_features, out_features, bias=bias, device="meta")
        return cls(meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Int8MatMul.apply(x, self.weight_int8, self.scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight this layer computes with, (out_features, in_features)."""
        return self.weight_int8.float() * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class _Int8MatMul(torch.autograd.Function):
    """`x @ (scale * W_int8)^T` and a gradient for x only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, scale)
        flat = x.reshape(-1, x.shape[-1]).float().contiguous()
        y = torch.nn.functional.linear(flat, w.float()) * scale
        return y.reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        w, scale = ctx.saved_tensors
        return ((grad.float() * scale) @ w.float()).to(grad.dtype), None, None


def quantize_int8(model: nn.Module, keep: Iterable[str] = KEEP_FP32) -> nn.Module:
    """Replace the model's linear layers by `Int8Linear`, in place.

    Works on a plain model (inference) and on a PEFT-wrapped one (the frozen bases of the
    LoRA layers are quantized; the LoRA matrices are not).

    Args:
        model: a causal LM, possibly with LoRA attached.
        keep: module names (last path component) left in fp32; by default the tied
            `lm_head`.

    Returns:
        The same model object.
    """
    for name, linear in _targets(model, set(keep)):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Int8Linear(linear))
    return model


def _targets(model: nn.Module, keep: set[str]) -> list[tuple[str, nn.Linear]]:
    """The linear layers `quantize_int8` replaces; refuses a `keep` name the model lacks
    and a model with nothing left to quantize."""
    names = [name for name, _ in model.named_modules()]
    unknown = sorted(k for k in keep if not any(n.rsplit(".", 1)[-1] == k for n in names))
    if unknown:
        raise ConfigError(
            f"quantize int8: keep={unknown} names no module of this model; give the last "
            "part of a module name, e.g. lm_head"
        )
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not _kept(name, keep)
    ]
    if not targets and any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ConfigError(
            "quantize int8: this model is already quantized; quantize the fp32 model once"
        )
    if not targets:
        raise ConfigError(
            "quantize int8: this model has no linear layers to quantize (outside "
            f"{sorted(keep)}); quantize a transformer LM with nn.Linear projections"
        )
    return targets


def _kept(name: str, keep: set[str]) -> bool:
    parts = name.split(".")
    return parts[-1] in keep or "lora_A" in parts or "lora_B" in parts


@contextmanager
def int8_as_linear(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every `Int8Linear` of `model` is an `nn.Linear` stand-in, so PEFT
    wraps it as it wraps any linear (it knows no custom layer types); on exit each stand-in,
    wherever PEFT moved it (a `LoraLayer.base_layer`), is the `Int8Linear` again.

    This is how a LoRA is attached to a model loaded from an int8 folder: the result is
    the one `attach` then `quantize_int8` gives. A stand-in's weight is a stride-0 view of
    a single zero of the right shape, so no fp32 weight is allocated; nothing may compute
    with it inside the block.
    """
    originals: dict[int, Int8Linear] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8Linear):
            stand_in = nn.Linear(module.in_features, module.out_features, bias=False)
            shape = (module.out_features, module.in_features)
            stand_in.weight = nn.Parameter(torch.zeros(()).expand(shape), requires_grad=False)
            originals[id(stand_in)] = module
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, stand_in)
    try:
        yield model
    finally:
        for name, module in list(model.named_modules()):
            if id(module) in originals:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, originals[id(module)])


def linear_weight_bytes(model: nn.Module, keep: Iterable[str] = KEEP_FP32) -> int:
    """Bytes held by the weights (and int8 scales) of the linear layers outside `keep`.

    Counts `nn.Linear.weight` and `Int8Linear`'s int8 weight plus scales, so the same call
    before and after `quantize_int8` gives the size ratio; LoRA matrices are excluded.
    """
    keep = set(keep)
    total = 0
    for name, module in model.named_modules():
        if _kept(name, keep):
            continue
        if isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, Int8Linear):
            total += module.weight_int8.numel() + module.scale.numel() * 4
    return total
