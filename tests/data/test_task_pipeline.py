"""Every built-in dataset through the loop's path: load_splits -> build_task ->
prepare_rows -> collate -> example_losses / evaluate, on stories260K."""

from __future__ import annotations

import math

import pytest
import torch

from edgetune.data import TASKS, DataConfig, build_task, load_splits

EXPECTED_METRICS = {
    "classification": {"accuracy", "loss"},
    "instruction": {"loss", "perplexity", "rougeL"},
    "lm": {"loss", "perplexity"},
}


def test_registry_names_match_task_names(tokenizer, shared_data):
    for name in TASKS:
        dataset = {"classification": "sst2", "instruction": "dolly-openqa", "lm": "tinystories"}
        cfg = DataConfig(dataset=dataset[name], eval_size=2, train_size=2, max_length=32)

        task = build_task(load_splits(cfg, 0), cfg, tokenizer)

        assert task.name == name


@pytest.mark.parametrize("dataset", ["bbc-news", "sst2", "ag-news", "dolly-openqa", "tinystories"])
def test_builtin_dataset_runs_through_the_task(dataset, tokenizer, tiny_lm, shared_data):
    cfg = DataConfig(dataset=dataset, eval_size=4, train_size=8, max_length=32, max_new_tokens=2)
    splits = load_splits(cfg, seed=0)
    task = build_task(splits, cfg, tokenizer)

    train_rows, eval_rows = task.prepare_rows(splits.train), task.prepare_rows(splits.eval)
    batch = task.collate(train_rows[:4])
    losses = task.example_losses(tiny_lm, batch)
    metrics = task.evaluate(tiny_lm, eval_rows, batch_size=2)

    assert batch["input_ids"].shape[1] <= 32
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert losses.shape == (len(train_rows[:4]),) and torch.isfinite(losses).all()
    assert set(metrics) == EXPECTED_METRICS[splits.task]
    assert all(math.isfinite(v) for v in metrics.values())
