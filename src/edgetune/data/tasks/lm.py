"""Language modelling on packed token blocks (next-token cross-entropy).

`prepare_rows` tokenizes the documents (with the tokenizer's usual leading special ids,
e.g. BOS), joins them with eos after each, and cuts the stream into blocks of exactly
`max_length` tokens; the incomplete tail is dropped, unless there is no full block at
all, in which case the whole stream is one shorter block. The per-example loss is the
mean next-token cross-entropy over a block; `evaluate` averages over all predicted
tokens and reports perplexity = exp(loss). `next_token_losses` is shared with the
instruction task, which uses the same loss on response tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from edgetune.data.config import DataConfig
from edgetune.data.splits import DataSplits
from edgetune.data.tasks.base import LossLogits, batches, evaluating
from edgetune.data.tasks.tokens import eos_token_id, pad_right, pad_token_id
from edgetune.errors import DataError


def next_token_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and token count per example, both [B] fp32.

    Positions whose target label is -100 (prompt, padding) are ignored.
    """
    found = next_token_loss_logits(model, batch, reduce=False)
    return found.losses, found.read.sum(dim=1).float()


def next_token_loss_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], reduce: bool = True
) -> LossLogits:
    """Next-token cross-entropy per example and the logits it reads, [B, T-1, V].

    With `reduce` the loss is the mean over each example's counted tokens; without, the
    sum (callers that average over a whole split divide by the total count).
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1, :].float()
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    read = targets != -100
    total = losses.sum(dim=1)
    losses = total / read.sum(dim=1).float().clamp_min(1.0) if reduce else total
    return LossLogits(losses, logits, read)


class LMTask:
    """Causal language modelling; metrics: loss and perplexity."""

    name = "lm"

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pad_id = pad_token_id(tokenizer)
        self.eos_id = eos_token_id(tokenizer)

    @classmethod
    def from_splits(cls, splits: DataSplits, cfg: DataConfig, tokenizer: Any) -> LMTask:
        """Build from `cfg.max_length` (the block size)."""
        return cls(tokenizer, cfg.max_length)

    def prepare_rows(self, rows: Sequence[dict]) -> list[dict]:
        """Documents `{"text"}` -> blocks `{"input_ids": list[int]}` (blocks are kept as is).

        Raises:
            DataError: the documents hold fewer than two tokens in all.
        """
        if not rows or "input_ids" in rows[0]:
            return list(rows)
        stream: list[int] = []
        # verbose=False: documents longer than model_max_length are fine, they get cut into blocks
        encoded = self.tokenizer([row["text"] for row in rows], verbose=False)["input_ids"]
        for ids in encoded:
            stream.extend(ids)
            if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
                stream.append(self.eos_id)
        if len(stream) < 2:
            raise DataError("the lm documents hold fewer than 2 tokens; add text to the dataset")
        size = self.max_length
        blocks = [stream[i : i + size] for i in range(0, len(stream) - size + 1, size)]
        return [{"input_ids": block} for block in (blocks or [stream])]

    def collate(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask / labels (= input_ids, -100 on padding), right-padded."""
        seqs = [row["input_ids"] for row in rows]
        return pad_right(seqs, seqs, self.pad_id)

    def example_losses(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Mean next-token cross-entropy per block, [B]."""
        return self.loss_logits(model, batch).losses

    def loss_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossLogits:
        """The mean next-token loss per block and the logits it reads, [B, T-1, V]."""
        return next_token_loss_logits(model, batch)

    def evaluate(
        self,
        model: torch.nn.Module,
        rows: Sequence[dict],
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> dict[str, float]:
        """loss (mean over all predicted tokens) and perplexity = exp(loss)."""
        rows = self.prepare_rows(rows)
        if not rows:
            raise DataError("no rows to evaluate; set data.eval_size above 0")
        total, count = 0.0, 0.0
        with evaluating(model):
            for chunk in batches(rows, batch_size, on_batch):
                sums, counts = next_token_losses(model, self.collate(chunk))
                total, count = total + float(sums.sum()), count + float(counts.sum())
        loss = total / max(count, 1.0)
        return {"loss": loss, "perplexity": math.exp(loss)}
