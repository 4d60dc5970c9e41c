"""Inference speed of a causal LM on this CPU: prefill latency and greedy decode rate.

Both are measured at batch 1 (what a device serving one user runs): prefill as the latency
of one forward pass over PREFILL_TOKENS random tokens, decode as tokens per second of a
greedy generation of DECODE_TOKENS new tokens after an 8-token prompt. Each is the median
of `repeats` runs, so one slow run (a page fault, a neighbour) does not set the figure.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

PREFILL_TOKENS = 128
DECODE_TOKENS = 32
PROMPT_TOKENS = 8


def prefill_ids(vocab_size: int, seed: int) -> torch.Tensor:
    """Random token ids (1, PREFILL_TOKENS), the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, PREFILL_TOKENS), generator=generator)


@torch.no_grad()
def measure_speed(model: Any, ids: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median prefill ms over `ids` and median greedy decode tokens/s, `repeats` runs each."""
    model.eval()
    prompt = ids[:, :PROMPT_TOKENS]
    prefill, decode = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=ids)
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=DECODE_TOKENS,
            min_new_tokens=DECODE_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
        decode.append((out.shape[1] - PROMPT_TOKENS) / (time.perf_counter() - start))
    return {
        "prefill_ms": 1000 * statistics.median(prefill),
        "decode_tokens_per_s": statistics.median(decode),
    }
