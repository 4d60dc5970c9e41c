"""Log-likelihoods of a context's candidate endings, read the way lm-evaluation-harness
reads them for multiple-choice benchmarks.

For a context c and endings e_1..e_K (each scored as the continuation " " + e_k), the
score of ending k is the sum of its tokens' log-probabilities given everything before:

    LL_k = sum_{t = |c|}^{|c| + |e_k| - 1} log softmax(logits[t - 1])[x_t]

Notable choices:
- Tokenization follows lm-evaluation-harness: the context and the context + continuation
  are each encoded without special tokens (no BOS), and the continuation's tokens are the
  whole encoding's after the context's length. All K sequences then start with the same
  context tokens.
- One forward pass per batch of contexts, all K endings of each inside it, padded on the
  right: a pad sits after every real token of its row, so causal attention never lets a
  real token see it and its logits are never read. Sequences are [B*K, T].
- Only logits from the first ending prediction on are computed (`logits_to_keep`): the
  context's own next-token logits are never read, and the vocabulary projection of a
  large-vocabulary model is a fifth of its forward cost.
- A context too long for the model's positions is cut on the left (as lm-evaluation-
  harness does), by as much as the longest of its endings needs, so the K sequences keep
  one shared context.
- Log-softmax in fp32 whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from edgetune.errors import DataError


@dataclass(frozen=True)
class EncodedChoices:
    """One multiple-choice item as token ids.

    Attributes:
        context: the context's tokens (shared by every ending), at least one.
        endings: each ending's continuation tokens, at least one each.
    """

    context: list[int]
    endings: list[list[int]]

    @property
    def longest(self) -> int:
        """Tokens of the longest context + ending sequence."""
        return len(self.context) + max(len(e) for e in self.endings)


def encode_choices(
    tokenizer: Any, context: str, endings: Sequence[str], max_tokens: int, where: str
) -> EncodedChoices:
    """`context` and each `" " + ending`, tokenized as lm-evaluation-harness does, the
    context cut on the left to fit `max_tokens` positions; `where` names the item in
    messages (e.g. "line 7 of FILE").

    Raises:
        DataError: an ending that has no tokens, or one longer than the model's positions.
    """
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    encoded = []
    for ending in endings:
        whole = tokenizer(context + " " + ending, add_special_tokens=False)["input_ids"]
        tail = list(whole[len(context_ids) :])
        if not tail:
            raise DataError(f"{where}: the ending {ending[:60]!r} has no tokens; drop the item")
        if len(tail) >= max_tokens:
            raise DataError(
                f"{where}: the ending {ending[:60]!r} is {len(tail)} tokens long, which "
                f"leaves no context within the model's {max_tokens} positions; drop the item "
                f"or use a model with a longer context"
            )
        encoded.append(tail)
    overflow = len(context_ids) + max(len(e) for e in encoded) - max_tokens
    return EncodedChoices(list(context_ids[max(0, overflow) :]), encoded)


def ending_logliks(model: Any, items: Sequence[EncodedChoices]) -> list[torch.Tensor]:
    """The summed log-likelihood of every ending of every item, from one forward pass.

    Args:
        model: a causal LM whose forward takes `input_ids`, `attention_mask` and
            `logits_to_keep` and returns `.logits` [B, kept, V].
        items: the items of the pass; their endings are the pass's rows.

    Returns:
        One fp32 tensor [K_i] per item, on the CPU.
    """
    rows = [(item.context, ending) for item in items for ending in item.endings]
    width = max(len(c) + len(e) for c, e in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (context, ending) in enumerate(rows):
        ids[r, : len(context) + len(ending)] = torch.tensor(context + ending)
        mask[r, : len(context) + len(ending)] = 1
    # the earliest position whose logits are read: the one before the shortest context ends
    first = min(len(c) for c, _ in rows) - 1
    device = next(model.parameters()).device
    out = model(
        input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=width - first
    )
    logprobs = torch.log_softmax(out.logits.float(), dim=-1).cpu()
    sums = []
    for r, (context, ending) in enumerate(rows):
        at = torch.arange(len(context) - 1, len(context) + len(ending) - 1) - first
        sums.append(logprobs[r, at, torch.tensor(ending)].sum())
    flat = torch.stack(sums)
    counts = [len(item.endings) for item in items]
    return list(torch.split(flat, counts))
