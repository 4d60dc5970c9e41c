"""A benchmark scored over llama.cpp's logits: a GGUF file behind the causal-LM forward
that `edgetune.eval.choice.ending_logliks` calls.

It checks edgetune's scorer and its GGUF export against an independent runtime: the
same items, the same token ids (from the Hugging Face tokenizer, fed to llama.cpp as
given, no BOS) and the same arithmetic on the logits, so any difference in acc or
acc_norm comes from the logits alone.

Notable choices:
- Rows are evaluated one at a time (llama.cpp's Python binding keeps one sequence), and
  a row that starts like the previous one keeps the KV cache of their common prefix:
  the four endings of a task share their context, so it is evaluated once, as
  `llama-perplexity --hellaswag` does.
- The attention mask only says where a row ends (padding is on the right).
- Run as a module for the benchmark in docs/BENCHMARKS.md:

      python -m edgetune.eval.llama_cpp FILE.gguf --tokenizer MODEL --task hellaswag \\
          --eval-size 1000 --seed 0 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetune.errors import DataError
from edgetune.export.llama_cpp import open_llama


@dataclass
class Output:
    """What the scorer reads of a forward pass."""

    logits: torch.Tensor


class LlamaCppCausalLM:
    """llama.cpp's logits for padded batches of token ids, shaped as a Hugging Face
    causal LM returns them ([B, logits_to_keep, V], fp32)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.cached: list[int] = []  # the tokens llama.cpp's KV cache holds, in order

    def parameters(self) -> Iterator[torch.Tensor]:
        """No weights in PyTorch: the scorer's inputs stay on the CPU."""
        yield torch.empty(0)

    def eval(self) -> LlamaCppCausalLM:
        """Already inference-only (for callers that set eval mode)."""
        return self

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
    ) -> Output:
        width = input_ids.shape[1]
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            logits = self._row(ids[: sum(mask)])
            kept = np.zeros((logits_to_keep, logits.shape[1]), dtype=np.float32)
            start = width - logits_to_keep
            kept[: max(0, len(logits) - start)] = logits[start:]
            rows.append(torch.from_numpy(kept))
        return Output(torch.stack(rows))

    def _row(self, tokens: list[int]) -> np.ndarray:
        if len(tokens) > self.llm.n_ctx():
            raise DataError(
                f"a sequence of {len(tokens)} tokens exceeds llama.cpp's context of "
                f"{self.llm.n_ctx()}; open the model with a larger n_ctx"
            )
        common = 0
        while common < min(len(tokens), len(self.cached)) and tokens[common] == self.cached[common]:
            common += 1
        common = min(common, len(tokens) - 1)  # re-evaluate at least one token
        self.llm.n_tokens = common
        self.llm.eval(tokens[common:])
        self.cached = list(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Score a benchmark over llama.cpp's logits; prints and returns the summary."""
    from edgetune import models
    from edgetune.console import quiet_third_party
    from edgetune.eval import BENCHMARKS

    parser = argparse.ArgumentParser(prog="python -m edgetune.eval.llama_cpp")
    parser.add_argument("gguf", type=Path, help="the GGUF file (edgetune export --format gguf)")
    parser.add_argument("--tokenizer", required=True, help="the model whose tokenizer to use")
    parser.add_argument("--task", default="hellaswag", choices=sorted(BENCHMARKS))
    parser.add_argument("--dataset", type=Path, help="the benchmark file (default: shared)")
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-ctx", type=int, default=1024)
    args = parser.parse_args(argv)
    quiet_third_party()
    start = time.perf_counter()
    benchmark = BENCHMARKS[args.task]
    items = benchmark.load(args.dataset or benchmark.default_file(), args.eval_size, args.seed)
    _, tokenizer = models.load(args.tokenizer)
    tokenizer.model_max_length = args.n_ctx
    llm = open_llama(args.gguf, n_ctx=args.n_ctx, threads=args.threads)
    try:
        scored = benchmark.score(LlamaCppCausalLM(llm), tokenizer, items, 4)
    finally:
        llm.close()
    summary = {
        "runtime": "llama.cpp",
        "gguf": str(args.gguf),
        "benchmark": benchmark.name,
        "seed": args.seed,
        "eval_examples": len(items),
        **{f"eval/{k}": v for k, v in scored.items()},
        "wall_s": time.perf_counter() - start,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
