"""Int8 with int8 activations: fbgemm's dynamic quantized linear over a smoothed model,
the fast int8 path on CPUs without AVX-512 (`--quantize int8-dynamic`).

`torch.ao.quantization.quantize_dynamic` replaces each `nn.Linear` by a module that keeps
its weight as int8 with one scale per output row (per-channel) and, at every call,
quantizes the input activations to int8 with one scale per tensor, multiplies in int8
and rescales to fp32. On an AVX2 CPU this is the only int8 GEMM in torch 2.13 faster than
fp32; the weight-only `Int8Linear` of `compress/quantize.py` is about as fast as fp32 and
`torch._int_mm` / `torch._weight_int8pack_mm` are 30-50x slower. The per-tensor
activation scale is what costs accuracy: SmolLM2 has a few outlier activation channels,
so the model is smoothed first (`compress/smooth.py`) and only then quantized.

SmolLM2-135M, one thread of a shared 2-core AVX2 CPU (indicative), batch 1 x 128-token
prefill, 32-token greedy decode, logits on a 128-token story against fp32:

| model                      | prefill | decode     | max logit err | top-1 agree |
|----------------------------|---------|------------|---------------|-------------|
| fp32                       | 497 ms  | 18.0 tok/s | -             | -           |
| dynamic int8, no smoothing | 330 ms  | 25.3 tok/s | 73.7 %        | 48 %        |
| smoothed + dynamic int8    | 333 ms  | 24.4 tok/s | 24.3 %        | 91 %        |
| `Int8Linear` (weight-only) | 483 ms  | 16.9 tok/s | 4.7 %         | 97 %        |

On bbc-news (a LoRA fine-tuned for 30 first-order steps, merged; 150 held-out rows)
accuracy is 0.900 in fp32, 0.840 dynamic int8 unsmoothed, 0.893 smoothed, 0.907
`Int8Linear`.

Trade-offs a user sees:
- no backward: a LoRA cannot be trained over these modules (`peft.attach` refuses);
- `torch.ao.quantization` is deprecated (it still runs in torch 2.13); its warning is
  silenced here because the choice is deliberate and documented;
- `lm_head` stays fp32 (tied to the embedding in Llama-family small models).

On disk (`save_int8_dynamic`): the SMOOTHED fp32 model, stock safetensors, plus the
config entry `"edgetune_int8_dynamic": {"format": 1, "keep_fp32": ["lm_head"]}`;
`edgetune.models.load` re-applies `quantize_dynamic` when it sees that entry. So the file
is fp32-sized (the int8 saving is in memory), and stock transformers loads it as an fp32
model computing the same function as the unsmoothed one.
"""

from __future__ import annotations

import gc
import itertools
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetune.compress.quantize import KEEP_FP32
from edgetune.errors import ConfigError

CONFIG_KEY = "edgetune_int8_dynamic"
FORMAT = 1


def quantize_dynamic_int8(model: nn.Module, keep: Iterable[str] = KEEP_FP32) -> nn.Module:
    """Replace the model's linear layers (outside `keep`) by fbgemm dynamic int8 linears
    with per-channel weight scales, in place; records `CONFIG_KEY` in `model.config`.

    Args:
        model: a plain causal LM (smoothed; no LoRA layers: merge them first).
        keep: module names (last path component) left in fp32.

    Returns:
        The same model object, for inference only.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    keep = set(keep)
    if any("lora_A" in n.split(".") for n, _ in model.named_modules()):
        raise ConfigError("quantize int8-dynamic: the model carries LoRA layers; merge them first")
    spec = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in keep
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*deprecated.*")
        quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    _copy_out_of_file(model)
    model.config.update({CONFIG_KEY: {"format": FORMAT, "keep_fp32": sorted(keep)}})
    return model


def _copy_out_of_file(model: nn.Module) -> None:
    """Copy the tensors left in fp32 (embedding, norms) out of a memory-mapped safetensors
    file, so the pages of the fp32 linear weights just replaced stop counting in the
    process's resident size (as `int8_folder.release_file_pages` does for `Int8Linear`;
    the packed int8 weights are not parameters and are left alone)."""
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.data = tensor.data.clone()
    gc.collect()


def is_dynamic_int8(model: nn.Module) -> bool:
    """Whether `model` holds dynamic quantized linear layers."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return any(isinstance(m, DynamicLinear) for m in model.modules())


def save_int8_dynamic(smoothed: nn.Module, folder: Path | str) -> None:
    """Write the smoothed fp32 model with the config entry that makes
    `edgetune.models.load` quantize it at load (call before `quantize_dynamic_int8`)."""
    smoothed.config.update({CONFIG_KEY: {"format": FORMAT, "keep_fp32": list(KEEP_FP32)}})
    smoothed.save_pretrained(folder)


def requantize_on_load(model: Any) -> Any:
    """`model` quantized as its config's `CONFIG_KEY` entry asks; unchanged without one."""
    entry = getattr(model.config, CONFIG_KEY, None)
    if entry is None:
        return model
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        raise ConfigError(
            f"config.json has {CONFIG_KEY}={entry!r}, not a format this edgetune reads "
            f"(format {FORMAT}); write the model again with edgetune compress --quantize "
            "int8-dynamic"
        )
    return quantize_dynamic_int8(model, entry.get("keep_fp32", KEEP_FP32))


def dynamic_weight_bytes(model: nn.Module) -> int:
    """Bytes of the int8 weights plus one fp32 scale per row of the dynamic linears (the
    same accounting as `quantize.linear_weight_bytes` gives `Int8Linear`)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return sum(
        m.in_features * m.out_features + 4 * m.out_features
        for m in model.modules()
        if isinstance(m, DynamicLinear)
    )
