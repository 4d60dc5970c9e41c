"""HellaSwag (Zellers et al., ACL 2019): choose how a scene goes on, among four endings.

The file is the official validation split (10,042 tasks) in the layout llama.cpp's
`llama-perplexity --hellaswag` reads, six lines per task:

    Roof shingle removal: A man is sitting on a roof. he     activity_label: ctx
    3                                                         the gold ending's index, 0-3
    is using wrap to wrap a pair of skis.                     ending 0
    is ripping level tiles off.                               endings 1 to 3, one a line
    ...

Scored as lm-evaluation-harness scores its `hellaswag` task, so figures compare with
published ones: each ending is the continuation " " + ending of the context, LL_k its
summed log-likelihood (`edgetune.eval.choice`), and

    acc      = [argmax_k LL_k == gold]
    acc_norm = [argmax_k LL_k / len(ending_k) == gold]

with len the ending's length in characters, as lm-evaluation-harness divides by
`len(choice)` of the choice string (no leading space; its byte length differs for 199 of
the 40,168 endings, those with non-ASCII characters). Reported with 95 % Wilson intervals
(`edgetune.eval.interval`).

Text preprocessing. lm-evaluation-harness reads the Hugging Face dataset and builds the
context as `preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`, each
ending as `preprocess(ending)`, where `preprocess` strips, turns " [title]" into ". ",
deletes every bracketed `[...]` and turns double spaces into single ones. llama.cpp's file
has done part of that: no " [title]", `[header]` or `[step]` tag is left; but 13 lines
keep bracketed text ("[www.kiddio.org]", "[insert name of town]") and one a double space,
so the same `preprocess` is applied here to contexts and endings. The file also keeps
ctx_b as the dataset has it, lower case ("... on a roof. he"), where lm-evaluation-harness
capitalizes it ("He"). The file does not mark where ctx_b starts, so the context's last
sentence (after its last ". ", "! " or "? ") is taken as ctx_b when it starts with a
lower-case letter (3,243 of the 10,042 contexts) and capitalized with `str.capitalize`,
as lm-evaluation-harness does.

Quick runs score a sample: `size` tasks drawn with `random.Random(seed)`, kept in file
order (size >= the file's tasks: all of them). Passes group tasks of similar token length
(`batch_size` sequences, four per task) to waste little compute on padding; the metrics
do not depend on the grouping.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgetune.errors import DataError
from edgetune.eval.choice import encode_choices, ending_logliks
from edgetune.eval.interval import wilson_interval
from edgetune.paths import shared_file

LINES_PER_TASK = 6
ENDINGS = 4
SHARED_FILE = "datasets/hellaswag_val/hellaswag_val_full.txt"

_BRACKETED = re.compile(r"\[.*?\]")
_LAST_SENTENCE = re.compile(r"(?<=[.!?]) ")


@dataclass(frozen=True)
class HellaSwagTask:
    """One task, its text already as lm-evaluation-harness scores it.

    Attributes:
        where: "FILE, line N", the line its context is on, for messages.
        context: "activity_label: ctx".
        endings: the four candidate endings.
        gold: the index of the right ending.
    """

    where: str
    context: str
    endings: tuple[str, ...]
    gold: int


def preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag text clean-up (see the module docstring)."""
    text = text.strip().replace(" [title]", ". ")
    return _BRACKETED.sub("", text).replace("  ", " ")


def capitalize_ctx_b(context: str) -> str:
    """`context` with its last sentence capitalized when it starts in lower case (the
    dataset's ctx_b, which lm-evaluation-harness capitalizes)."""
    parts = _LAST_SENTENCE.split(context)
    last = parts[-1]
    if len(parts) < 2 or not last[:1].islower():
        return context
    head = context[: len(context) - len(last)]
    return head + last.capitalize()


def default_file() -> Path:
    """The validation file in the shared data folder.

    Raises:
        DataError: it is in none of the folders searched (names them and the fix).
    """
    return shared_file(
        SHARED_FILE,
        "the HellaSwag file",
        "pass a file in llama.cpp's HellaSwag layout with --dataset",
    )


def read_tasks(path: Path) -> list[HellaSwagTask]:
    """Every task of a file in llama.cpp's HellaSwag layout, text preprocessed.

    Raises:
        DataError: the file is missing, unreadable or malformed (names the file, the line
            and what was expected there).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"cannot read the HellaSwag file {path} ({exc}); pass a UTF-8 text file in "
            f"llama.cpp's HellaSwag layout (6 lines per task)"
        ) from None
    lines = text.splitlines()
    if not lines:
        raise DataError(f"{path} is empty; a HellaSwag file has 6 lines per task")
    if len(lines) % LINES_PER_TASK:
        start = len(lines) - len(lines) % LINES_PER_TASK + 1
        raise DataError(
            f"{path}, line {start}: the last task has {len(lines) % LINES_PER_TASK} of its "
            f"{LINES_PER_TASK} lines (context, gold index, {ENDINGS} endings); the file is "
            f"truncated or a line is missing or extra above"
        )
    return [_task(path, lines, i) for i in range(0, len(lines), LINES_PER_TASK)]


def _task(path: Path, lines: list[str], at: int) -> HellaSwagTask:
    block = lines[at : at + LINES_PER_TASK]
    for offset, line in enumerate(block):
        if not line.strip():
            what = (
                "the context" if offset == 0 else "the gold index" if offset == 1 else "an ending"
            )
            raise DataError(
                f"{path}, line {at + offset + 1}: empty, where {what} should be (6 lines "
                f"per task: context, gold index 0-3, {ENDINGS} endings)"
            )
    gold = block[1].strip()
    if gold not in {str(i) for i in range(ENDINGS)}:
        raise DataError(
            f"{path}, line {at + 2}: {gold[:40]!r} is not a gold ending index 0-{ENDINGS - 1} "
            f"(6 lines per task: context, gold index, {ENDINGS} endings); a line is missing "
            f"or extra above"
        )
    return HellaSwagTask(
        where=f"{path}, line {at + 1}",
        context=capitalize_ctx_b(preprocess(block[0])),
        endings=tuple(preprocess(e) for e in block[2:]),
        gold=int(gold),
    )


def load(path: Path, size: int, seed: int) -> list[HellaSwagTask]:
    """`size` tasks of `path` drawn with `seed`, in file order (all when size >= the
    file's tasks).

    Raises:
        DataError: see `read_tasks`.
    """
    tasks = read_tasks(path)
    if size >= len(tasks):
        return tasks
    keep = sorted(random.Random(seed).sample(range(len(tasks)), size))
    return [tasks[i] for i in keep]


def score(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[HellaSwagTask],
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """acc and acc_norm of `model` on `tasks`, with their 95 % Wilson intervals.

    Args:
        model: a causal LM (see `ending_logliks`), in eval mode.
        tokenizer: its tokenizer; `model_max_length` is taken as the model's positions.
        tasks: the tasks to score (at least one).
        batch_size: sequences per forward pass, rounded down to whole tasks (at least one).
        on_batch: called with the number of tasks after each pass (a progress bar).

    Returns:
        acc, acc_norm and their `_ci95_low` / `_ci95_high`.
    """
    positions = tokenizer.model_max_length
    encoded = [encode_choices(tokenizer, t.context, t.endings, positions, t.where) for t in tasks]
    order = sorted(range(len(tasks)), key=lambda i: encoded[i].longest)
    per_pass = max(1, batch_size // ENDINGS)
    right, right_norm = 0, 0
    with torch.no_grad():
        for start in range(0, len(order), per_pass):
            chunk = order[start : start + per_pass]
            sums = ending_logliks(model, [encoded[i] for i in chunk])
            for i, lls in zip(chunk, sums, strict=True):
                right += _pick(lls, tasks[i].endings, normalise=False) == tasks[i].gold
                right_norm += _pick(lls, tasks[i].endings, normalise=True) == tasks[i].gold
            if on_batch is not None:
                on_batch(len(chunk))
    return _metrics(right, right_norm, len(tasks))


def _pick(lls: torch.Tensor, endings: Sequence[str], normalise: bool) -> int:
    if normalise:  # (an ending preprocessing emptied counts as one character)
        lls = lls / lls.new_tensor([float(max(1, len(e))) for e in endings])
    return int(lls.argmax())


def _metrics(right: int, right_norm: int, n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, count in (("acc", right), ("acc_norm", right_norm)):
        low, high = wilson_interval(count, n)
        out |= {name: count / n, f"{name}_ci95_low": low, f"{name}_ci95_high": high}
    return out
