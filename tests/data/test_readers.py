"""Readers: tsv/csv/jsonl/json/txt round trips and the errors for bad files and names."""

from __future__ import annotations

import pytest

from edgetune.data import DataConfig, load_splits, read_rows
from edgetune.errors import DataError


def test_tsv_keeps_quotes_and_trailing_spaces(make_file):
    path = make_file("train.tsv", 'sentence\tlabel\nhe said "hi , there \t1\nbleak \t0\n')

    rows = read_rows(path)

    assert rows == [
        {"sentence": 'he said "hi , there ', "label": "1"},
        {"sentence": "bleak ", "label": "0"},
    ]


def test_csv_honours_quoted_commas(make_file):
    path = make_file(
        "news.csv", 'label,title,description\n3,"Fears, hopes",plain text\n4,B,"x, y"\n'
    )

    rows = read_rows(path)

    assert rows == [
        {"label": "3", "title": "Fears, hopes", "description": "plain text"},
        {"label": "4", "title": "B", "description": "x, y"},
    ]


def test_jsonl_skips_blank_lines(make_file):
    path = make_file(
        "qa.jsonl", '{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"}\n'
    )

    rows = read_rows(path)

    assert rows == [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]


def test_json_list_and_json_lines_both_read(make_file):
    listed = make_file("a.json", '[{"text": "x", "label": 1}, {"text": "y", "label": 0}]')
    lines = make_file("b.json", '{"text": "x", "label": 1}\n{"text": "y", "label": 0}\n')

    assert (
        read_rows(listed)
        == read_rows(lines)
        == [
            {"text": "x", "label": 1},
            {"text": "y", "label": 0},
        ]
    )


def test_txt_is_one_row_with_the_whole_text(make_file):
    text = "Once upon a time.\n\nThe end.\n"
    path = make_file("story.txt", text)

    assert read_rows(path) == [{"text": text}]


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.tsv"

    with pytest.raises(DataError, match="does not exist") as info:
        read_rows(path)

    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("name", "text"),
    [("empty.tsv", "sentence\tlabel\n"), ("empty.txt", "  \n"), ("empty.jsonl", "\n\n")],
)
def test_empty_file_names_the_path(make_file, name, text):
    path = make_file(name, text)

    with pytest.raises(DataError, match="no rows") as info:
        read_rows(path)

    assert str(path) in str(info.value)


def test_unknown_extension_names_the_path_and_the_formats(make_file):
    path = make_file("data.xlsx", "whatever")

    with pytest.raises(DataError) as info:
        read_rows(path)

    message = str(info.value)
    assert str(path) in message and ".xlsx" in message
    assert all(ext in message for ext in (".tsv", ".csv", ".jsonl", ".txt"))


def test_ragged_tsv_line_is_reported_with_its_number(make_file):
    path = make_file("bad.tsv", "sentence\tlabel\ngood\t1\nno label here\n")

    with pytest.raises(DataError, match="line 3"):
        read_rows(path)


def test_bad_jsonl_line_is_reported_with_its_number(make_file):
    path = make_file("bad.jsonl", '{"text": "ok"}\n{"text": \n')

    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_rows(path)


def test_hub_id_offline_lists_everything_tried(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)

    with pytest.raises(DataError) as info:
        load_splits(DataConfig(dataset="someone/some-data"), seed=0)

    message = str(info.value)
    assert "sst2" in message and "bbc-news" in message  # the built-in names
    assert "someone/some-data" in message and "file " in message  # the path checked
    assert "unreachable" in message and "internet" in message


def test_unknown_name_that_is_not_a_hub_id_lists_the_builtins():
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(dataset="no-such-dataset"), seed=0)

    message = str(info.value)
    assert "no-such-dataset" in message and "tinystories" in message and "owner/name" in message


BOM = "\ufeff"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("d.csv", "sentence,label\ngood,1\n"),
        ("d.tsv", "sentence\tlabel\ngood\t1\n"),
        ("d.jsonl", '{"sentence": "good", "label": "1"}\n'),
        ("d.json", '[{"sentence": "good", "label": "1"}]'),
    ],
)
def test_a_byte_order_mark_is_not_part_of_the_first_column(make_file, name, text):
    assert read_rows(make_file(name, BOM + text)) == [{"sentence": "good", "label": "1"}]


def test_a_byte_order_mark_is_not_part_of_a_txt_text(make_file):
    assert read_rows(make_file("d.txt", BOM + "Once.\n")) == [{"text": "Once.\n"}]


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("d.jsonl", '{"text": "ok"}\n{"text": "cut \\ud83d"}\n', r"line 2, column 'text'"),
        ("d.jsonl", '{"messages": [{"content": "\\udfff"}]}\n', r"line 1, column 'messages'"),
        ("d.json", '[{"prompt": "a", "response": "\\ud800 b"}]', r"item 0, column 'response'"),
    ],
    ids=["high-half", "nested", "json-list"],
)
def test_a_lone_surrogate_is_refused_with_its_line_and_the_fix(make_file, name, text, where):
    path = make_file(name, text)

    with pytest.raises(DataError, match=rf"{name}: {where}.*alone.*write the whole pair"):
        read_rows(path)


def test_a_whole_surrogate_pair_is_text(make_file):
    path = make_file("d.jsonl", '{"text": "smile \\ud83d\\ude00"}\n')

    assert read_rows(path) == [{"text": "smile \U0001f600"}]
