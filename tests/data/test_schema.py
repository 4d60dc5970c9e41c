"""Columns, labels, verbalizers, templates and task inference for user files."""

from __future__ import annotations

import json

import pytest

from edgetune.data import DataConfig, load_splits
from edgetune.errors import ConfigError, DataError


def _jsonl(make_file, name, rows):
    return make_file(name, "\n".join(json.dumps(r) for r in rows) + "\n")


def test_two_text_fields_and_integer_labels_index_the_given_names(make_file):
    rows = [{"title": f"t{i}", "body": f"b{i}", "label": i % 3} for i in range(12)]
    path = _jsonl(make_file, "news.jsonl", rows)
    cfg = DataConfig(
        dataset=str(path), text_fields=["title", "body"], labels=["a", "b", "c"], eval_size=3
    )

    splits = load_splits(cfg, seed=0)

    assert splits.labels == ["a", "b", "c"] and splits.verbalizer == ["a", "b", "c"]
    assert splits.template == "Title: {title}\nBody: {body}\nAnswer:"
    by_title = {r["fields"]["title"]: r for r in splits.train + splits.eval}
    assert by_title["t4"] == {"fields": {"title": "t4", "body": "b4"}, "label": 1}


def test_integer_labels_without_names_become_sorted_classes(make_file):
    lines = ["label,title,description"] + [f"{1 + i % 4},t{i},d{i}" for i in range(20)]
    path = make_file("ag.csv", "\n".join(lines) + "\n")

    splits = load_splits(
        DataConfig(dataset=str(path), text_fields=["title", "description"], eval_size=4), 0
    )

    assert splits.labels == ["1", "2", "3", "4"]
    by_title = {r["fields"]["title"]: r["label"] for r in splits.train + splits.eval}
    assert by_title["t0"] == 0 and by_title["t3"] == 3


def test_string_labels_map_to_sorted_names_or_the_given_order(make_file):
    rows = [{"text": f"x{i}", "label": ["pos", "neg", "neutral"][i % 3]} for i in range(9)]
    path = _jsonl(make_file, "s.jsonl", rows)

    inferred = load_splits(DataConfig(dataset=str(path), eval_size=3), 0)
    given = load_splits(
        DataConfig(dataset=str(path), eval_size=3, labels=["pos", "neutral", "neg"]), 0
    )

    assert inferred.labels == ["neg", "neutral", "pos"]
    first = {r["fields"]["text"]: r["label"] for r in inferred.train + inferred.eval}
    second = {r["fields"]["text"]: r["label"] for r in given.train + given.eval}
    assert (first["x0"], second["x0"]) == (2, 0)  # "pos"
    assert (first["x1"], second["x1"]) == (0, 2)  # "neg"


def test_single_string_column_besides_the_label_is_the_text(make_file):
    rows = [{"id": i, "review": f"r{i}", "label": "ok" if i % 2 else "bad"} for i in range(6)]
    path = _jsonl(make_file, "r.jsonl", rows)

    splits = load_splits(DataConfig(dataset=str(path), eval_size=2), 0)

    assert splits.text_fields == ["review"] and splits.label_field == "label"


def test_template_placeholders_choose_the_text_fields(make_file):
    path = make_file("t.tsv", "a\tb\tlabel\n" + "".join(f"x{i}\ty{i}\t{i % 2}\n" for i in range(6)))

    splits = load_splits(
        DataConfig(dataset=str(path), template="B: {b}\nA: {a}\nClass:", eval_size=2), 0
    )

    assert splits.text_fields == ["b", "a"] and splits.template == "B: {b}\nA: {a}\nClass:"


def test_ambiguous_text_columns_ask_for_text_fields(make_file):
    path = make_file("t.tsv", "a\tb\tlabel\nx\ty\t1\nz\tw\t0\n")

    with pytest.raises(DataError, match="--text-fields") as info:
        load_splits(DataConfig(dataset=str(path), eval_size=1), 0)

    assert "columns are: a, b, label" in str(info.value)


def test_missing_text_column_lists_columns_and_the_flag(make_file):
    path = make_file("train.tsv", "sentence\tlabel\nfine\t1\nbad\t0\n")

    with pytest.raises(DataError) as info:
        load_splits(DataConfig(dataset=str(path), text_fields=["sentense"], eval_size=1), 0)

    message = str(info.value)
    assert "'sentense' not found" in message and "train.tsv" in message
    assert "columns are: sentence, label" in message and "--text-fields" in message


def test_missing_label_column_asks_for_label_field(make_file):
    path = make_file("train.tsv", "sentence\tclass\nfine\t1\nbad\t0\n")

    with pytest.raises(DataError, match="--label-field") as info:
        load_splits(DataConfig(dataset=str(path), label_field="label", eval_size=1), 0)

    assert "columns are: sentence, class" in str(info.value)


def test_unknown_label_names_the_row_and_value_and_lists_classes(make_file):
    path = make_file("train.tsv", "sentence\tlabel\na\tpos\nb\tneg\nc\tmeh\nd\tpos\n")

    with pytest.raises(DataError) as info:
        load_splits(DataConfig(dataset=str(path), labels=["neg", "pos"], eval_size=1), 0)

    message = str(info.value)
    assert "row 3" in message and "'meh'" in message and "neg, pos" in message


def test_stray_label_among_integers_is_reported_as_that_row(make_file):
    path = make_file("train.tsv", "sentence\tlabel\na\t0\nb\t1\nc\t1\nd\tx\n")

    with pytest.raises(DataError, match="row 4 .*'x'"):
        load_splits(DataConfig(dataset=str(path), eval_size=1), 0)


def test_verbalizer_length_must_match_the_classes(make_file):
    path = make_file("train.tsv", "sentence\tlabel\na\tpos\nb\tneg\nc\tpos\n")

    with pytest.raises(ConfigError, match="3 words but there are 2 classes"):
        load_splits(DataConfig(dataset=str(path), verbalizer=["x", "y", "z"], eval_size=1), 0)


def test_template_placeholder_must_be_a_text_field(make_file):
    path = make_file("train.tsv", "sentence\tlabel\na\tpos\nb\tneg\nc\tpos\n")
    cfg = DataConfig(
        dataset=str(path), text_fields=["sentence"], template="R: {review}\nA:", eval_size=1
    )

    with pytest.raises(ConfigError, match="'review'"):
        load_splits(cfg, 0)


def test_single_class_is_an_error(make_file):
    path = make_file("train.tsv", "sentence\tlabel\na\tpos\nb\tpos\nc\tpos\n")

    with pytest.raises(DataError, match="single class"):
        load_splits(DataConfig(dataset=str(path), eval_size=1), 0)


@pytest.mark.parametrize(
    ("rows", "task"),
    [
        ([{"prompt": "p", "response": "r"}] * 4, "instruction"),
        ([{"text": "### Human: hi ### Assistant: hello"}] * 4, "instruction"),
        ([{"text": "just prose"}] * 4, "lm"),
        ([{"sentence": "s", "label": 1}, {"sentence": "t", "label": 0}] * 2, "classification"),
    ],
)
def test_task_is_inferred_from_the_columns(make_file, rows, task):
    path = _jsonl(make_file, "d.jsonl", rows)

    assert load_splits(DataConfig(dataset=str(path), eval_size=1), 0).task == task


def test_uninferable_task_asks_for_task(make_file):
    path = _jsonl(make_file, "d.jsonl", [{"a": "x", "b": "y"}] * 3)

    with pytest.raises(ConfigError, match="--task"):
        load_splits(DataConfig(dataset=str(path), eval_size=1), 0)


def test_dialogue_text_without_markers_says_how_to_fix(make_file):
    path = _jsonl(
        make_file, "d.jsonl", [{"text": "### Human: a ### Assistant: b"}, {"text": "plain"}]
    )

    with pytest.raises(DataError, match="row 2 .*data.prompt_field"):
        load_splits(DataConfig(dataset=str(path), task="instruction", eval_size=1), 0)


def test_instruction_columns_are_normalised(make_file):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    path = _jsonl(make_file, "qa.jsonl", rows)

    splits = load_splits(DataConfig(dataset=str(path), eval_size=1), 0)

    assert (splits.prompt_field, splits.response_field) == ("question", "answer")
    assert {"prompt": "q3", "response": "a3"} in splits.train + splits.eval


def test_typed_backslash_n_in_a_template_is_a_newline(make_file):
    path = make_file("train.tsv", "sentence\tlabel\na\tpos\nb\tneg\nc\tpos\n")
    cfg = DataConfig(dataset=str(path), template="Review: {sentence}\\nSentiment:", eval_size=1)

    assert load_splits(cfg, 0).template == "Review: {sentence}\nSentiment:"
