"""Instruction tuning (SFT): loss on the response tokens only; ROUGE-L of greedy answers.

Format: "### Human: {prompt} ### Assistant:" + " " + response + eos. This fixed format
(the one Dolly open_qa ships in) is used for every model rather than the tokenizer's chat
template, so prompts are identical across base and instruct models and across runs;
chat templates differ per model and some tokenizers have none.

Each example is the prompt's tokens then the response's tokens (tokenized as they follow
"### Assistant:"); labels are -100 on prompt tokens and padding. When the pair exceeds
`max_length`, the response keeps at least half the budget (or all of itself, if shorter)
and the prompt text is shortened at the token level with its "### Human:"/"### Assistant:"
frame kept whole. Training batches are right-padded; generation prompts are left-padded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from edgetune.data.config import DataConfig
from edgetune.data.splits import DataSplits
from edgetune.data.tasks.base import LossLogits, batches, evaluating
from edgetune.data.tasks.lm import next_token_loss_logits, next_token_losses
from edgetune.data.tasks.prompt import cue_of, fill, fit_prompt, fixed_length
from edgetune.data.tasks.tokens import (
    continuation_ids,
    encode,
    eos_token_id,
    leading_special_ids,
    pad_left,
    pad_right,
    pad_token_id,
)
from edgetune.errors import ConfigError, DataError

PROMPT_TEMPLATE = "### Human: {prompt} ### Assistant:"


class InstructionTask:
    """Prompt -> response SFT; metrics: loss, perplexity and ROUGE-L F1."""

    name = "instruction"

    def __init__(self, tokenizer: Any, max_length: int, max_new_tokens: int):
        self.tokenizer, self.max_length, self.max_new_tokens = tokenizer, max_length, max_new_tokens
        self.template, self.cue = PROMPT_TEMPLATE, cue_of(PROMPT_TEMPLATE)
        self.leading = leading_special_ids(tokenizer)
        self.pad_id, self.eos_id = pad_token_id(tokenizer), eos_token_id(tokenizer)
        self.fixed = fixed_length(tokenizer, self.template, ["prompt"], self.leading)
        if self.fixed + 2 > max_length:
            raise ConfigError(
                f"the instruction frame {PROMPT_TEMPLATE!r} takes {self.fixed} tokens but "
                f"data.max_length is {max_length}; raise --max-length above {self.fixed + 1}"
            )

    @classmethod
    def from_splits(cls, splits: DataSplits, cfg: DataConfig, tokenizer: Any) -> InstructionTask:
        """Build from `cfg.max_length` and `cfg.max_new_tokens`."""
        return cls(tokenizer, cfg.max_length, cfg.max_new_tokens)

    def prepare_rows(self, rows: Sequence[dict]) -> list[dict]:
        """Rows are used as they are."""
        return list(rows)

    def prompt_ids(self, row: dict, budget: int | None = None) -> list[int]:
        """The framed prompt's ids, at most `budget` (default max_length) tokens."""
        budget = self.max_length if budget is None else budget
        fields = {"prompt": row["prompt"]}
        return fit_prompt(self.tokenizer, self.template, fields, budget, self.leading)

    def encode_example(self, row: dict) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids + eos), together at most max_length tokens."""
        response = continuation_ids(self.tokenizer, self.cue, " " + row["response"].strip())
        response += [self.eos_id] if self.eos_id is not None else []
        prompt = self.leading + encode(
            self.tokenizer, fill(self.template, {"prompt": row["prompt"]})
        )
        if len(prompt) + len(response) <= self.max_length:
            return prompt, response
        keep = max(self.max_length - len(prompt), self.max_length // 2)
        keep = min(len(response), keep, self.max_length - self.fixed)
        return self.prompt_ids(row, self.max_length - keep), response[:keep]

    def collate(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask / labels (-100 on prompt and padding), right-padded."""
        seqs, labels = [], []
        for row in rows:
            prompt, response = self.encode_example(row)
            seqs.append(prompt + response)
            labels.append([-100] * len(prompt) + response)
        return pad_right(seqs, labels, self.pad_id)

    def example_losses(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over each example's response tokens, [B]."""
        return self.loss_logits(model, batch).losses

    def loss_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossLogits:
        """The mean response-token loss and the logits it reads, [B, T-1, V]."""
        return next_token_loss_logits(model, batch)

    def generate(self, model: torch.nn.Module, rows: Sequence[dict]) -> list[str]:
        """Greedy answers (text after the cue, cut at a new "### Human:" turn)."""
        ids, mask = pad_left([self.prompt_ids(row) for row in rows], self.pad_id)
        generator: Any = model  # nn.Module has no `generate` in its type; HF models do
        out = generator.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
        )
        texts = self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        return [text.split("### Human:")[0].strip() for text in texts]

    def evaluate(
        self,
        model: torch.nn.Module,
        rows: Sequence[dict],
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> dict[str, float]:
        """loss (mean over response tokens), perplexity and rougeL (F1 in [0, 1])."""
        from rouge_score import rouge_scorer

        if not rows:
            raise DataError("no rows to evaluate; set data.eval_size above 0")
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        total, count, rouge = 0.0, 0.0, 0.0
        with evaluating(model):
            for chunk in batches(rows, batch_size, on_batch):
                sums, counts = next_token_losses(model, self.collate(chunk))
                total, count = total + float(sums.sum()), count + float(counts.sum())
                for row, answer in zip(chunk, self.generate(model, chunk), strict=True):
                    rouge += scorer.score(row["response"], answer)["rougeL"].fmeasure
        loss = total / max(count, 1.0)
        return {"loss": loss, "perplexity": math.exp(loss), "rougeL": rouge / len(rows)}
