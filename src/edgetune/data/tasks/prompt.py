"""Prompt building: fill a template with fields truncated at the token level.

The template's fixed text (in particular the answer cue at its end, such as "Topic:") is
always kept whole; only the fields are shortened. The token budget left after the fixed
text is shared out by water-filling (short fields keep all their tokens, long ones split
the rest evenly). A field is cut at a token boundary using the tokenizer's character
offsets, then the whole prompt is tokenized as one string, so the model sees the same
tokens it would for naturally short text; if boundary effects still overshoot, the
longest field is shortened further until the prompt fits.
"""

from __future__ import annotations

import string
from typing import Any

from edgetune.data.tasks.tokens import encode


def fill(template: str, values: dict[str, str]) -> str:
    """`template` with each `{name}` replaced by `values[name]` (format specs ignored)."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(literal)
        if name is not None:
            parts.append(values[name])
    return "".join(parts)


def cue_of(template: str) -> str:
    """The fixed text after the template's last placeholder (the answer cue)."""
    parsed = list(string.Formatter().parse(template))
    tail = []
    for literal, name, _, _ in reversed(parsed):
        tail.append(literal)
        if name is not None:
            break
    return "".join(reversed(tail))


def fixed_length(tokenizer: Any, template: str, names: list[str], leading: list[int]) -> int:
    """Tokens of the template with every field empty (special leading ids included)."""
    return len(leading) + len(encode(tokenizer, fill(template, dict.fromkeys(names, ""))))


def share(lengths: dict[str, int], budget: int) -> dict[str, int]:
    """Water-filling: each field gets min(its length, an even share of what is left)."""
    alloc = {}
    remaining = max(budget, 0)
    ordered = sorted(lengths.items(), key=lambda item: item[1])
    for i, (name, length) in enumerate(ordered):
        alloc[name] = min(length, remaining // (len(ordered) - i))
        remaining -= alloc[name]
    return alloc


def cut_text(tokenizer: Any, text: str, max_tokens: int) -> str:
    """The longest prefix of `text` of at most `max_tokens` tokens (cut at a token end)."""
    if max_tokens <= 0:
        return ""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        ids = encode(tokenizer, text)  # slow tokenizers have no offsets: decode instead
        return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])
    if len(offsets) <= max_tokens:
        return text
    return text[: offsets[max_tokens - 1][1]].rstrip()


def fit_prompt(
    tokenizer: Any, template: str, fields: dict[str, str], max_tokens: int, leading: list[int]
) -> list[int]:
    """Token ids of the filled template, at most `max_tokens`, template text kept whole.

    Args:
        tokenizer: a Hugging Face tokenizer.
        template: text with `{field}` placeholders.
        fields: field name -> text.
        max_tokens: the budget for the whole prompt, including `leading`.
        leading: special ids to put first (e.g. [bos]).

    Returns:
        `leading` + the prompt's ids; longer than `max_tokens` only if the template
        alone is (callers check `fixed_length` up front).
    """
    ids = leading + encode(tokenizer, fill(template, fields))
    if len(ids) <= max_tokens:
        return ids
    budget = max_tokens - fixed_length(tokenizer, template, list(fields), leading)
    lengths = {name: len(encode(tokenizer, text)) for name, text in fields.items()}
    alloc = share(lengths, budget)
    while True:
        cut = {name: cut_text(tokenizer, text, alloc[name]) for name, text in fields.items()}
        ids = leading + encode(tokenizer, fill(template, cut))
        if len(ids) <= max_tokens or not any(alloc.values()):
            return ids
        longest = max(alloc, key=lambda name: alloc[name])
        alloc[longest] = max(0, alloc[longest] - (len(ids) - max_tokens))
