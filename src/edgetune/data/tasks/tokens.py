"""Token-level building blocks shared by the tasks: special ids, continuations, padding.

Choices:
- The tokenizer is never mutated. Without a pad token, eos (else unk) is used as the pad
  id internally; padded positions are always masked (attention_mask 0, labels -100).
- The special tokens a tokenizer puts before text (Llama's BOS; none for GPT-2 style
  tokenizers) are found once by tokenizing a probe string with and without them.
- How a piece of text is tokenized when it *follows* other text (a verbalizer word after
  the cue, a response after "### Assistant:") is found by tokenizing prefix + text and
  dropping the prefix's tokens: SentencePiece-style tokenizers add a word-start marker to
  text tokenized alone, so tokenizing " sport" on its own gives a different first token
  than it has after "Topic:".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from edgetune.errors import ConfigError


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_token_id(tokenizer: Any) -> int:
    """The pad id: the tokenizer's pad, else eos, else unk.

    Raises:
        ConfigError: the tokenizer has none of the three.
    """
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError("the tokenizer has no pad, eos or unk token; use a causal LM tokenizer")


def eos_token_id(tokenizer: Any) -> int | None:
    """The tokenizer's eos id (None if it has none)."""
    value = getattr(tokenizer, "eos_token_id", None)
    return value if isinstance(value, int) else None


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The special ids the tokenizer puts before text (e.g. [bos] for Llama, [] for GPT-2)."""
    plain = encode(tokenizer, "Hello")
    full = list(tokenizer("Hello", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def continuation_ids(tokenizer: Any, prefix: str, text: str) -> list[int]:
    """Token ids of `text` as it is tokenized right after `prefix`."""
    before = encode(tokenizer, prefix)
    after = encode(tokenizer, prefix + text)
    common = 0
    while common < min(len(before), len(after)) and before[common] == after[common]:
        common += 1
    return after[common:]


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to the longest sequence: (input_ids, attention_mask), both [B, T] long."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask


def pad_right(
    seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad ids and labels: input_ids, attention_mask, labels (-100 on padding)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    out_labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (seq, lab) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
        out_labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": out_labels}
