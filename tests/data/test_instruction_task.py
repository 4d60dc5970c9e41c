"""Instruction task: response-only labels, truncation, loss parity and ROUGE-L."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edgetune.data import DataConfig, DataSplits, build_task

ROWS = [
    {"prompt": "Who was Lily?", "response": "Lily was a little girl who loved to play."},
    {"prompt": "Where did Tom go?", "response": "To the park."},
    {"prompt": "What did the dog find?", "response": "The dog found a big red ball in the garden."},
]


def _task(tokenizer, max_length=96, max_new_tokens=4):
    splits = DataSplits(train=[], eval=[], task="instruction", prompt_field="prompt")
    cfg = DataConfig(max_length=max_length, max_new_tokens=max_new_tokens)
    return build_task(splits, cfg, tokenizer)


def test_labels_are_minus_100_exactly_on_prompt_and_padding(tokenizer):
    task = _task(tokenizer)

    batch = task.collate(ROWS)

    width = batch["input_ids"].shape[1]
    for i, row in enumerate(ROWS):
        prompt, response = task.encode_example(row)
        labels, ids = batch["labels"][i].tolist(), batch["input_ids"][i].tolist()
        end = len(prompt) + len(response)
        assert labels[: len(prompt)] == [-100] * len(prompt)
        assert labels[len(prompt) : end] == ids[len(prompt) : end] == response
        assert labels[end:] == [-100] * (width - end)
        assert batch["attention_mask"][i].tolist() == [1] * end + [0] * (width - end)
        assert response[-1] == tokenizer.eos_token_id
    decoded = tokenizer.decode(task.encode_example(ROWS[1])[0], skip_special_tokens=True)
    assert decoded == "### Human: Where did Tom go? ### Assistant:"


def test_long_pairs_keep_the_frame_and_the_start_of_the_response(tokenizer):
    task = _task(tokenizer, max_length=64)
    row = {
        "prompt": "Tell me a story. " * 30,
        "response": "Once upon a time there was a cat. " * 10,
    }

    prompt, response = task.encode_example(row)

    assert len(prompt) + len(response) <= 64
    assert len(response) >= 32  # at least half the budget
    text = tokenizer.decode(prompt, skip_special_tokens=True)
    assert text.startswith("### Human: Tell me a") and text.endswith("### Assistant:")
    assert len(text) < len(row["prompt"])  # the prompt text was shortened, the frame kept
    assert tokenizer.decode(response).startswith("Once upon a time there was a cat.")


def test_example_losses_are_the_mean_response_token_loss(tokenizer, tiny_lm):
    task = _task(tokenizer)

    losses = task.example_losses(tiny_lm, task.collate(ROWS))

    assert losses.shape == (3,) and torch.isfinite(losses).all()
    for i, row in enumerate(ROWS):
        prompt, response = task.encode_example(row)
        with torch.no_grad():
            logits = tiny_lm(input_ids=torch.tensor([prompt + response])).logits[0]
        predicted = logits[len(prompt) - 1 : -1]  # the positions that predict response tokens
        expected = F.cross_entropy(predicted, torch.tensor(response))
        assert float(losses[i].detach()) == pytest.approx(float(expected), abs=1e-5)


def test_evaluate_reports_loss_perplexity_and_rouge_in_range(tokenizer, tiny_lm):
    task = _task(tokenizer, max_new_tokens=4)

    metrics = task.evaluate(tiny_lm, ROWS, batch_size=2)

    assert set(metrics) == {"loss", "perplexity", "rougeL"}
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert 0.0 <= metrics["rougeL"] <= 1.0
    assert not tiny_lm.training


def test_generation_is_greedy_left_padded_and_bounded(tokenizer, tiny_lm):
    task = _task(tokenizer, max_new_tokens=5)

    batched = task.generate(tiny_lm, ROWS)
    single = [task.generate(tiny_lm, [row])[0] for row in ROWS]

    assert batched == single  # left padding does not change greedy answers
    assert all(len(tokenizer(a, add_special_tokens=False).input_ids) <= 6 for a in batched)


@pytest.mark.parametrize(("answers", "expected"), [("references", 1.0), ("empty", 0.0)])
def test_rouge_is_the_mean_f1_against_references(
    tokenizer, tiny_lm, monkeypatch, answers, expected
):
    task = _task(tokenizer)
    replies = {r["prompt"]: (r["response"] if answers == "references" else "") for r in ROWS}
    monkeypatch.setattr(task, "generate", lambda model, rows: [replies[r["prompt"]] for r in rows])

    assert task.evaluate(tiny_lm, ROWS, batch_size=2)["rougeL"] == pytest.approx(expected)
