"""Classification as next-token prediction: prompt + verbalizer (MeZO / LM-BFF style).

The prompt is the template filled with the example's text fields, truncated at the token
level so it fits `max_length` with the answer cue kept (see `prompt.py`). The model's
next-token logits at the end of the prompt, restricted to one token per class (the first
token of each verbalizer word as it follows the cue, e.g. " sport" after "Topic:"), are
the class logits; the per-example loss is their cross-entropy with the class index.

Batches are LEFT-padded so the answer position is the last one for every row, and the
model is called with `logits_to_keep=1` so only that position's logits are computed.
No position_ids are passed: with RoPE only relative positions matter, so a left-padded
row gives the same logits as the unpadded row (to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from edgetune.data.config import DataConfig
from edgetune.data.resolve import default_template
from edgetune.data.splits import DataSplits
from edgetune.data.tasks.base import LossLogits, batches, evaluating
from edgetune.data.tasks.prompt import cue_of, fit_prompt, fixed_length
from edgetune.data.tasks.tokens import (
    continuation_ids,
    leading_special_ids,
    pad_left,
    pad_token_id,
)
from edgetune.errors import ConfigError, DataError


def verbalizer_token_ids(tokenizer: Any, words: Sequence[str], cue: str) -> list[int]:
    """The first token of each word as it follows `cue` after a space.

    Raises:
        ConfigError: two words share their first token (the message lists them).
    """
    ids = []
    for word in words:
        tokens = continuation_ids(tokenizer, cue, " " + word.strip())
        if not tokens:
            raise ConfigError(f"verbalizer word {word!r} tokenizes to nothing; pick another")
        ids.append(tokens[0])
    seen: dict[int, str] = {}
    for word, token in zip(words, ids, strict=True):
        if token in seen:
            piece = tokenizer.convert_ids_to_tokens(token)
            raise ConfigError(
                f"verbalizer words {seen[token]!r} and {word!r} share their first token "
                f"{piece!r} ({token}) in this tokenizer, so the classes cannot be told apart; "
                f"pass --verbalizer with words that start differently (one per class)"
            )
        seen[token] = word
    return ids


def last_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token logits at the last position, [B, V] fp32."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    try:
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    except TypeError:  # models without logits_to_keep: compute all and keep the last
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits[:, -1, :].float()


class ClassificationTask:
    """Prompt + verbalizer classification; metrics: accuracy and loss."""

    name = "classification"

    def __init__(
        self,
        tokenizer: Any,
        template: str,
        text_fields: list[str],
        labels: list[str],
        verbalizer: list[str],
        max_length: int,
    ):
        self.tokenizer, self.template, self.text_fields = tokenizer, template, text_fields
        self.labels, self.verbalizer, self.max_length = labels, verbalizer, max_length
        self.leading = leading_special_ids(tokenizer)
        self.pad_id = pad_token_id(tokenizer)
        fixed = fixed_length(tokenizer, template, text_fields, self.leading)
        if fixed >= max_length:
            raise ConfigError(
                f"the template alone takes {fixed} tokens but data.max_length is {max_length}; "
                f"raise --max-length above {fixed} or shorten --template"
            )
        self.verbalizer_ids = verbalizer_token_ids(tokenizer, verbalizer, cue_of(template))

    @classmethod
    def from_splits(cls, splits: DataSplits, cfg: DataConfig, tokenizer: Any) -> ClassificationTask:
        """Build from the resolved splits metadata and `cfg.max_length`."""
        return cls(
            tokenizer,
            splits.template or default_template(splits.text_fields),
            splits.text_fields,
            splits.labels,
            splits.verbalizer,
            cfg.max_length,
        )

    def prepare_rows(self, rows: Sequence[dict]) -> list[dict]:
        """Rows are used as they are."""
        return list(rows)

    def prompt_ids(self, row: dict) -> list[int]:
        """Token ids of one example's prompt (at most max_length, cue kept)."""
        fields = {name: row["fields"][name] for name in self.text_fields}
        return fit_prompt(self.tokenizer, self.template, fields, self.max_length, self.leading)

    def collate(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask (left-padded) and labels (class indices) [B]."""
        ids, mask = pad_left([self.prompt_ids(row) for row in rows], self.pad_id)
        labels = torch.tensor([row["label"] for row in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def class_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the verbalizer tokens, [B, num_classes] fp32."""
        return last_logits(model, batch)[:, self.verbalizer_ids]

    def example_losses(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Cross-entropy of the class logits with the class index, [B]."""
        return self.loss_logits(model, batch).losses

    def loss_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossLogits:
        """The class-logit cross-entropy and the full next-token logits it reads, [B, 1, V]."""
        logits = last_logits(model, batch)
        losses = F.cross_entropy(logits[:, self.verbalizer_ids], batch["labels"], reduction="none")
        read = torch.ones(logits.shape[0], 1, dtype=torch.bool)
        return LossLogits(losses, logits.unsqueeze(1), read)

    def evaluate(
        self,
        model: torch.nn.Module,
        rows: Sequence[dict],
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> dict[str, float]:
        """accuracy (argmax over the class logits) and mean loss over `rows`."""
        if not rows:
            raise DataError("no rows to evaluate; set data.eval_size above 0")
        correct, total_loss = 0, 0.0
        with evaluating(model):
            for chunk in batches(rows, batch_size, on_batch):
                batch = self.collate(chunk)
                logits = self.class_logits(model, batch)
                losses = F.cross_entropy(logits, batch["labels"], reduction="none")
                correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
                total_loss += float(losses.sum())
        return {"accuracy": correct / len(rows), "loss": total_loss / len(rows)}
