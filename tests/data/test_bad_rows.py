"""Data files that would train on the wrong thing: other separators, empty rows, a
'text' column beside others. Each is an error, or a visible warning when training can
sensibly go on."""

from __future__ import annotations

import json

import pytest

from edgetune.data import DataConfig, load_splits, read_rows
from edgetune.errors import ConfigError, DataError


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("d.csv", "sentence;label\ngood;1\n", r"separated by semicolons.*comma-separated"),
        ("d.csv", "sentence\tlabel\ngood\t1\n", r"separated by tabs.*name it \.tsv"),
        ("d.tsv", "sentence,label\ngood,1\n", r"separated by commas.*name it \.csv"),
        ("d.csv", "sentence|label\ngood|1\n", r"separated by pipes"),
    ],
)
def test_a_file_in_another_separator_is_refused(make_file, name, text, message):
    path = make_file(name, text)

    with pytest.raises(DataError, match=message):
        read_rows(path)


def test_a_single_text_column_still_reads(make_file):
    path = make_file("d.csv", 'text\n"Once, upon a time; a fox."\nThe end.\n')

    assert read_rows(path) == [{"text": "Once, upon a time; a fox."}, {"text": "The end."}]


def test_partly_empty_rows_are_dropped_with_a_warning(make_file, capsys):
    body = "a fine film,good\n,bad\na dull film,bad\n  ,good\n" * 3
    path = make_file("d.csv", "sentence,label\n" + body)

    splits = load_splits(DataConfig(dataset=str(path), eval_size=2), 0)

    rows = splits.train + splits.eval
    assert len(rows) == 6
    assert all(r["fields"]["sentence"].strip() for r in rows)
    err = capsys.readouterr().err
    assert "warning: dropped 6 of 12 rows" in err
    assert "(rows 2, 4, 6, 8, 10 ...)" in err


def test_two_text_fields_keep_a_row_with_one_of_them(make_file, capsys):
    path = make_file("d.csv", "title,body,label\n" + "T,,good\n,B,bad\n" * 3)

    splits = load_splits(
        DataConfig(dataset=str(path), text_fields=["title", "body"], eval_size=1), 0
    )

    assert len(splits.train) + len(splits.eval) == 6
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("rows", "task", "kept"),
    [
        (
            [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": " "}] * 3,
            "instruction",
            3,
        ),
        ([{"text": "a story"}, {"text": ""}] * 3, "lm", 3),
    ],
)
def test_empty_instruction_and_lm_rows_are_dropped(make_file, capsys, rows, task, kept):
    path = make_file("d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    splits = load_splits(DataConfig(dataset=str(path), task=task, eval_size=1), 0)

    assert len(splits.train) + len(splits.eval) == kept
    assert f"dropped 3 of 6 rows of {path}" in capsys.readouterr().err


def test_an_empty_label_is_an_error(make_file):
    path = make_file("d.csv", "sentence,label\na,pos\nb,neg\nc,\n")

    with pytest.raises(DataError, match=r"row 3 .* empty label in column 'label'"):
        load_splits(DataConfig(dataset=str(path), eval_size=1), 0)


def test_a_text_column_beside_others_asks_for_the_task(make_file):
    path = make_file("d.csv", "text,sentiment\n" + "a fine film,pos\na dull film,neg\n" * 3)

    with pytest.raises(ConfigError, match=r"sentiment.*--task lm.*--label-field sentiment"):
        load_splits(DataConfig(dataset=str(path), eval_size=1), 0)
    splits = load_splits(DataConfig(dataset=str(path), task="lm", eval_size=1), 0)
    assert splits.task == "lm"


def test_max_length_beyond_the_model_context_is_refused(stories260k_path):
    from edgetune import models
    from edgetune.data import build_task

    _, tokenizer = models.load(str(stories260k_path))
    cfg = DataConfig(dataset="sst2", eval_size=2, train_size=4, max_length=513)
    splits = load_splits(cfg, 0)

    with pytest.raises(ConfigError, match=r"max_length=513 is beyond the model's context of 512"):
        build_task(splits, cfg, tokenizer)
    cfg.max_length = 512
    assert build_task(splits, cfg, tokenizer) is not None
