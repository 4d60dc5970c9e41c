"""LM task: packed blocks, per-block losses and perplexity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edgetune.data import DataConfig, DataSplits, build_task
from edgetune.data.tasks.lm import LMTask

DOCS = [
    {"text": "Once upon a time, there was a little girl named Lily. She loved to play outside."},
    {"text": "Tom had a red ball. He threw it to his dog, and the dog ran after it."},
    {"text": "The sun was warm. The birds sang in the tall green tree all day long."},
]


def _task(tokenizer, max_length=32) -> LMTask:
    splits = DataSplits(train=[], eval=[], task="lm", text_fields=["text"])
    return build_task(splits, DataConfig(max_length=max_length), tokenizer)


def test_blocks_have_max_length_tokens_and_follow_the_stream(tokenizer):
    task = _task(tokenizer)
    stream = []
    for doc in DOCS:
        stream += tokenizer(doc["text"])["input_ids"] + [tokenizer.eos_token_id]

    blocks = task.prepare_rows(DOCS)

    assert len(blocks) == len(stream) // 32
    assert all(len(b["input_ids"]) == 32 for b in blocks)
    assert sum((b["input_ids"] for b in blocks), []) == stream[: 32 * len(blocks)]
    assert task.prepare_rows(blocks) == blocks and task.prepare_rows([]) == []


def test_text_shorter_than_a_block_is_one_short_block(tokenizer):
    blocks = _task(tokenizer, max_length=512).prepare_rows(DOCS[:1])

    assert len(blocks) == 1 and blocks[0]["input_ids"][-1] == tokenizer.eos_token_id


def test_example_losses_are_mean_next_token_losses(tokenizer, tiny_lm):
    task = _task(tokenizer)
    blocks = task.prepare_rows(DOCS)

    losses = task.example_losses(tiny_lm, task.collate(blocks))

    assert losses.shape == (len(blocks),) and losses.dtype == torch.float32
    for loss, block in zip(losses.detach(), blocks, strict=True):
        ids = torch.tensor([block["input_ids"]])
        with torch.no_grad():
            logits = tiny_lm(input_ids=ids).logits[0]
        assert float(loss) == pytest.approx(
            float(F.cross_entropy(logits[:-1], ids[0, 1:])), abs=1e-5
        )


def test_evaluate_perplexity_is_exp_of_loss(tokenizer, tiny_lm):
    task = _task(tokenizer)
    blocks = task.prepare_rows(DOCS)

    metrics = task.evaluate(tiny_lm, blocks, batch_size=2)

    assert set(metrics) == {"loss", "perplexity"}
    assert metrics["perplexity"] == math.exp(metrics["loss"])
    with torch.no_grad():
        per_block = task.example_losses(tiny_lm, task.collate(blocks))
    assert metrics["loss"] == pytest.approx(float(per_block.mean()), abs=1e-5)  # equal blocks
    assert 0 < metrics["loss"] < math.log(tokenizer.vocab_size)  # better than uniform
