"""Classification task on the real stories260K tokenizer and model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgetune.data import DataConfig, DataSplits, build_task
from edgetune.data.tasks.classification import ClassificationTask
from edgetune.errors import ConfigError

LABELS = ["business", "entertainment", "politics", "sport", "tech"]
LONG = "The minister said the budget would rise again next year. " * 40


def _task(tokenizer, max_length=48, verbalizer=None, template="Article: {text}\nTopic:"):
    splits = DataSplits(
        train=[],
        eval=[],
        task="classification",
        text_fields=["text"],
        labels=LABELS,
        verbalizer=verbalizer or LABELS,
        template=template,
    )
    return build_task(splits, DataConfig(max_length=max_length), tokenizer)


def _rows():
    texts = ["Shares fell.", LONG, "The striker scored twice in the cup final.", "New phone chips."]
    return [{"fields": {"text": t}, "label": i % 5} for i, t in enumerate(texts)]


def test_verbalizer_uses_the_first_token_after_the_cue(tokenizer):
    task = _task(tokenizer)

    pieces = tokenizer.convert_ids_to_tokens(task.verbalizer_ids)

    assert pieces[LABELS.index("sport")] == "▁s"
    assert pieces[LABELS.index("politics")] == "▁p"
    assert len(set(task.verbalizer_ids)) == 5


def test_long_text_is_truncated_and_the_cue_kept(tokenizer):
    task = _task(tokenizer, max_length=40)

    ids = task.prompt_ids({"fields": {"text": LONG}, "label": 0})

    assert len(ids) == 40 or len(ids) == 39  # a cut at a token boundary may free one token
    assert ids[0] == tokenizer.bos_token_id
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded.startswith("Article: The minister said")
    assert decoded.endswith("\nTopic:")


def test_two_fields_share_the_budget_and_a_short_field_stays_whole(tokenizer):
    splits = DataSplits(
        [],
        [],
        "classification",
        text_fields=["title", "body"],
        labels=["a", "b"],
        verbalizer=["yes", "no"],
        template="Title: {title}\nBody: {body}\nAnswer:",
    )
    task = build_task(splits, DataConfig(max_length=48), tokenizer)

    ids = task.prompt_ids({"fields": {"title": "Short title", "body": LONG}, "label": 0})

    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) <= 48
    assert decoded.startswith("Title: Short title\nBody: The minister")
    assert decoded.endswith("\nAnswer:")


def test_left_padding_puts_every_last_real_token_at_the_end(tokenizer):
    task = _task(tokenizer)
    rows = _rows()

    batch = task.collate(rows)

    lengths = [len(task.prompt_ids(r)) for r in rows]
    assert len(set(lengths)) > 1  # the batch really needs padding
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"][:, -1].tolist() == [1, 1, 1, 1]
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    for row, ids, mask in zip(rows, batch["input_ids"], batch["attention_mask"], strict=True):
        assert ids[mask.bool()].tolist() == task.prompt_ids(
            row
        )  # real tokens, in order, at the end
    assert batch["labels"].tolist() == [0, 1, 2, 3]
    assert tokenizer.pad_token is None  # the caller's tokenizer is left alone


def _hand_losses(task, model, rows):
    out = []
    for row in rows:
        ids = torch.tensor([task.prompt_ids(row)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]  # full logits, no padding
        class_logits = logits[task.verbalizer_ids].unsqueeze(0)
        out.append(F.cross_entropy(class_logits, torch.tensor([row["label"]])))
    return torch.stack(out)


def test_example_losses_match_unpadded_single_forwards(tokenizer, tiny_lm):
    task = _task(tokenizer)
    rows = _rows()

    losses = task.example_losses(tiny_lm, task.collate(rows))

    assert losses.shape == (4,) and losses.dtype == torch.float32
    torch.testing.assert_close(
        losses.detach(), _hand_losses(task, tiny_lm, rows), atol=1e-5, rtol=1e-5
    )


def test_example_losses_are_differentiable(tokenizer, tiny_lm):
    task = _task(tokenizer)

    task.example_losses(tiny_lm, task.collate(_rows())).mean().backward()

    grad = tiny_lm.model.embed_tokens.weight.grad
    tiny_lm.zero_grad(set_to_none=True)
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_models_without_logits_to_keep_give_the_same_losses(tokenizer, tiny_lm):
    class NoLogitsToKeep(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    task = _task(tokenizer)
    batch = task.collate(_rows())

    with torch.no_grad():
        wrapped = task.example_losses(NoLogitsToKeep(tiny_lm), batch)
        direct = task.example_losses(tiny_lm, batch)

    torch.testing.assert_close(wrapped, direct)


def test_evaluate_matches_a_hand_count_and_restores_train_mode(tokenizer, tiny_lm):
    task = _task(tokenizer)
    rows = _rows() * 2 + _rows()[:1]  # 9 rows: batches of 4, 4, 1
    hand = _hand_losses(task, tiny_lm, rows)
    predictions = []
    for row in rows:
        with torch.no_grad():
            logits = tiny_lm(input_ids=torch.tensor([task.prompt_ids(row)])).logits[0, -1]
        predictions.append(int(logits[task.verbalizer_ids].argmax()))
    expected_accuracy = sum(p == r["label"] for p, r in zip(predictions, rows, strict=True)) / 9
    tiny_lm.train()

    try:
        metrics = task.evaluate(tiny_lm, rows, batch_size=4)
        assert tiny_lm.training
    finally:
        tiny_lm.eval()

    assert set(metrics) == {"accuracy", "loss"}
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["accuracy"] == pytest.approx(expected_accuracy)
    assert metrics["loss"] == pytest.approx(float(hand.mean()), abs=1e-5)


def test_colliding_verbalizer_first_tokens_are_a_config_error(tokenizer):
    with pytest.raises(ConfigError) as info:
        _task(tokenizer, verbalizer=["business", "entertainment", "politics", "sport", "sports"])

    message = str(info.value)
    assert "'sport'" in message and "'sports'" in message and "--verbalizer" in message


def test_max_length_shorter_than_the_template_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="--max-length"):
        _task(tokenizer, max_length=8)


def test_build_task_picks_the_classification_task(tokenizer):
    assert isinstance(_task(tokenizer), ClassificationTask)
