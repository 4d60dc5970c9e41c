"""load_splits: deterministic, disjoint train/eval, caps, eval splits and empty splits."""

from __future__ import annotations

import pytest

from edgetune.data import DataConfig, load_splits
from edgetune.errors import DataError


@pytest.fixture
def reviews(make_file):
    lines = ["sentence\tlabel"] + [f"review number {i}\t{i % 2}" for i in range(50)]
    return make_file("reviews.tsv", "\n".join(lines) + "\n")


def _texts(rows):
    return [r["fields"]["sentence"] for r in rows]


def test_same_seed_same_splits_and_different_seed_different(reviews):
    cfg = DataConfig(dataset=str(reviews), eval_size=10)

    first, again, other = load_splits(cfg, 1), load_splits(cfg, 1), load_splits(cfg, 2)

    assert (first.train, first.eval) == (again.train, again.eval)
    assert _texts(first.eval) != _texts(other.eval)


def test_eval_and_train_are_disjoint_and_cover_the_data(reviews):
    splits = load_splits(DataConfig(dataset=str(reviews), eval_size=10), seed=0)

    train, evaluation = set(_texts(splits.train)), set(_texts(splits.eval))
    assert (len(train), len(evaluation)) == (40, 10)
    assert not train & evaluation
    assert train | evaluation == {f"review number {i}" for i in range(50)}


def test_train_size_caps_training_rows_without_changing_eval(reviews):
    full = load_splits(DataConfig(dataset=str(reviews), eval_size=10), seed=0)

    capped = load_splits(DataConfig(dataset=str(reviews), eval_size=10, train_size=7), seed=0)

    assert len(capped.train) == 7
    assert capped.eval == full.eval
    assert set(_texts(capped.train)) <= set(_texts(full.train))


def test_eval_size_zero_keeps_every_row_for_training(reviews):
    splits = load_splits(DataConfig(dataset=str(reviews), eval_size=0), seed=0)

    assert (len(splits.train), splits.eval) == (50, [])


def test_eval_size_as_large_as_the_data_is_an_error(reviews):
    with pytest.raises(DataError, match="eval_size=50 leaves none for training") as info:
        load_splits(DataConfig(dataset=str(reviews), eval_size=50), seed=0)

    assert "--eval-size 10" in str(info.value)


def test_eval_split_file_replaces_the_held_out_slice(reviews, make_file):
    held_out = make_file("dev.tsv", "sentence\tlabel\nnew one\t1\nnew two\t0\n")
    cfg = DataConfig(dataset=str(reviews), eval_split=str(held_out), eval_size=10)

    splits = load_splits(cfg, seed=0)

    assert len(splits.train) == 50
    assert _texts(splits.eval) == ["new one", "new two"]
    assert [r["label"] for r in splits.eval] == [1, 0]


def test_unknown_eval_split_lists_the_split_names(shared_data):
    with pytest.raises(DataError, match=r"a split name \(train, dev, test-labeled\)"):
        load_splits(DataConfig(dataset="sst2", eval_split="validation"), seed=0)


def test_lm_text_file_is_split_by_paragraph_documents(make_file):
    text = "\n\n".join(f"Paragraph {i} is here." for i in range(12))
    path = make_file("book.txt", text)

    splits = load_splits(DataConfig(dataset=str(path), eval_size=2), seed=0)

    assert splits.task == "lm"
    docs = sorted(r["text"] for r in splits.train + splits.eval)
    assert docs == sorted(f"Paragraph {i} is here." for i in range(12))
    assert len(splits.eval) == 2
