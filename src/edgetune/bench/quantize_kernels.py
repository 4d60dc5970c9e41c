"""Int8 kernels side by side on one model: fp32, torch dynamic int8, torchao int8
weight-only and edgetune's `Int8Linear`, timed the way `edgetune compress` times a model.

Each kernel quantizes a fresh copy of the same fp32 model, the same layers (every linear
but the tied `lm_head`), and reports median prefill latency (batch 1 x 128 tokens, `compress/speed.py`),
greedy decode tokens/s and how far its logits are from fp32 on the prefill tokens. torchao
is optional: without it its row says so instead of a timing.

Run: `python -m edgetune.bench.quantize_kernels smollm2-135m 1` (model, threads) prints
one JSON row per kernel.
"""

from __future__ import annotations

import copy
import gc
import json
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgetune.compress.quantize import KEEP_FP32, quantize_int8
from edgetune.compress.speed import measure_speed, prefill_ids

REPEATS = 5


def _fp32(model: nn.Module) -> nn.Module:
    return model


def _torch_dynamic(model: nn.Module) -> nn.Module:
    """torch.ao dynamic int8: int8 weights and per-tensor int8 activations."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    spec = {name: default_dynamic_qconfig for name in _linear_names(model)}
    return quantize_dynamic(model, spec, dtype=torch.qint8)


def _torchao_weight_only(model: nn.Module) -> nn.Module:
    """torchao int8 weight-only (per-channel int8 weights, fp32 activations)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    names = set(_linear_names(model))
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in names)
    return model


def _edgetune(model: nn.Module) -> nn.Module:
    return quantize_int8(model)


KERNELS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "fp32": _fp32,
    "torch-dynamic-int8": _torch_dynamic,
    "torchao-int8-weight-only": _torchao_weight_only,
    "edgetune-Int8Linear": _edgetune,
}


def _linear_names(model: nn.Module) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] not in KEEP_FP32
    ]


def kernel_timings(model: nn.Module, threads: int, repeats: int = REPEATS) -> list[dict[str, Any]]:
    """Time every kernel of KERNELS on a copy of the fp32 `model`.

    Args:
        model: an fp32 causal LM (left unchanged).
        threads: torch threads for the timings.
        repeats: timed runs per kernel (the median is reported).

    Returns:
        One dict per kernel: kernel, prefill_ms, decode_tokens_per_s,
        max_logit_error_pct (of the largest |fp32 logit|), top1_match (fraction of the
        prefill positions whose argmax equals fp32's), or kernel and error.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _rows(model, threads, repeats)
    finally:
        torch.set_num_threads(previous)


def _rows(model: nn.Module, threads: int, repeats: int) -> list[dict[str, Any]]:
    ids = prefill_ids(model.config.vocab_size, seed=0)
    with torch.no_grad():
        ref = model.eval()(input_ids=ids).logits
    rows = []
    for name, make in KERNELS.items():
        try:
            quantized = make(copy.deepcopy(model)).eval()
        except ImportError as exc:
            rows.append({"kernel": name, "error": f"not installed: {exc}"})
            continue
        rows.append({"kernel": name, "threads": threads, **_measure(quantized, ids, ref, repeats)})
        del quantized
        gc.collect()
    return rows


@torch.no_grad()
def _measure(
    model: nn.Module, ids: torch.Tensor, ref: torch.Tensor, repeats: int
) -> dict[str, float]:
    """Median prefill ms and decode tokens/s over `repeats`, and the logit error vs `ref`."""
    logits = model(input_ids=ids).logits  # also the warm-up
    return {
        **measure_speed(model, ids, repeats),
        "max_logit_error_pct": 100 * float((logits - ref).abs().max() / ref.abs().max()),
        "top1_match": float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
    }


if __name__ == "__main__":
    from edgetune import models

    spec, n_threads = sys.argv[1], int(sys.argv[2])
    for row in kernel_timings(models.load(spec)[0], n_threads):
        print(json.dumps(row), flush=True)
