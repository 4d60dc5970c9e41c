"""HellaSwag: the llama.cpp-layout file, lm-evaluation-harness's text preprocessing, the
seeded sample, and the batched scorer against a brute-force log-likelihood computed one
ending at a time (stories260K, real weights)."""

from __future__ import annotations

import pytest
import torch

from edgetune.errors import DataError
from edgetune.eval import hellaswag
from edgetune.eval.choice import encode_choices, ending_logliks
from edgetune.models import load

GOOD = (
    "Roof shingle removal: A man is sitting on a roof. he\n"
    "3\n"
    "is using wrap to wrap a pair of skis.\n"
    "is ripping level tiles off.\n"
    "is holding a rubik's cube.\n"
    "starts pulling up roofing on a roof.\n"
    "Family Life: Visit a site like [www.kiddio.org] to find  activities.\n"
    "0\n"
    "Try searching for [insert name of town] events.\n"
    "Choose [title] games.\n"
    "Ask a friend.\n"
    "Sing.\n"
)


@pytest.fixture(scope="module")
def stories(stories260k_path):
    torch.set_num_threads(1)
    return load(str(stories260k_path))


@pytest.fixture(scope="module")
def shared_tasks(shared_data):
    return hellaswag.read_tasks(shared_data / hellaswag.SHARED_FILE)


def test_good_file_parses_with_lm_eval_preprocessing(tmp_path):
    path = tmp_path / "hs.txt"
    path.write_text(GOOD)

    tasks = hellaswag.read_tasks(path)

    assert [t.gold for t in tasks] == [3, 0]
    assert tasks[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert tasks[0].endings[1] == "is ripping level tiles off."
    assert tasks[0].where == f"{path}, line 1"
    # brackets dropped, double spaces closed, " [title]" -> ". " (as lm-evaluation-harness)
    assert tasks[1].context == "Family Life: Visit a site like to find activities."
    assert tasks[1].endings[:2] == ("Try searching for events.", "Choose. games.")
    assert tasks[1].where == f"{path}, line 7"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace("\n3\n", "\nthree\n"), r"line 2: 'three' is not a gold ending index 0-3"),
        (GOOD.replace("\n0\n", "\n4\n"), r"line 8: '4' is not a gold ending index"),
        (GOOD.replace("Ask a friend.", ""), r"line 11: empty, where an ending should be"),
        (GOOD + "Dog: a dog.\n1\n", r"line 13: the last task has 2 of its 6 lines"),
        ("", r"is empty"),
    ],
    ids=["gold-word", "gold-4", "empty-ending", "truncated", "empty-file"],
)
def test_bad_file_is_a_data_error_naming_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)

    with pytest.raises(DataError, match=message) as caught:
        hellaswag.read_tasks(path)

    assert str(path) in str(caught.value)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt"):
        hellaswag.read_tasks(tmp_path / "nope.txt")


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        (
            "Canoeing: Two women are in a canoe. the child and a different man",
            "Canoeing: Two women are in a canoe. The child and a different man",
        ),
        (
            "Clean and jerk: A lady walks. She bends down. the lady",
            "Clean and jerk: A lady walks. She bends down. The lady",
        ),
        ("Home: How to paint a wall. Buy paint.", "Home: How to paint a wall. Buy paint."),
        ("Home: no sentence break here", "Home: no sentence break here"),
    ],
)
def test_ctx_b_is_capitalized_as_lm_eval_does(context, expected):
    assert hellaswag.capitalize_ctx_b(context) == expected


def test_shared_file_holds_the_validation_split(shared_tasks):
    assert len(shared_tasks) == 10042
    assert [t.gold for t in shared_tasks[:3]] == [3, 3, 2]
    assert all(len(t.endings) == 4 and all(t.endings) for t in shared_tasks)


def test_sample_is_seeded_and_in_file_order(shared_data):
    path = shared_data / hellaswag.SHARED_FILE

    first = hellaswag.load(path, 50, seed=0)
    again = hellaswag.load(path, 50, seed=0)
    other = hellaswag.load(path, 50, seed=1)

    lines = [int(t.where.rsplit(" ", 1)[1]) for t in first]
    assert [t.where for t in first] == [t.where for t in again]
    assert lines == sorted(lines) and len(set(lines)) == 50
    assert {t.where for t in first} != {t.where for t in other}
    assert len(hellaswag.load(path, 20000, seed=0)) == 10042


def _brute_force(model, tokenizer, context: str, ending: str) -> float:
    """Log-likelihood of " " + ending after context: one unpadded sequence, every
    position's logits, summed token by token."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + " " + ending, add_special_tokens=False)["input_ids"]
    ids = ctx + whole[len(ctx) :]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[t - 1, ids[t]]) for t in range(len(ctx), len(ids)))


def test_batched_scorer_equals_one_ending_at_a_time(stories, shared_tasks):
    # Prepare: tasks of different lengths, three per pass (12 rows, padded right)
    model, tokenizer = stories
    tasks = [shared_tasks[i] for i in (0, 1, 2, 5000, 9000, 10041)]
    encoded = [
        encode_choices(tokenizer, t.context, t.endings, tokenizer.model_max_length, t.where)
        for t in tasks
    ]
    # Execute
    with torch.no_grad():
        batched = ending_logliks(model, encoded[:3]) + ending_logliks(model, encoded[3:])
    expected = [[_brute_force(model, tokenizer, t.context, e) for e in t.endings] for t in tasks]
    # Assert
    for got, want in zip(batched, expected, strict=True):
        assert got.tolist() == pytest.approx(want, abs=1e-4)
    assert len({len(e.context) for e in encoded}) > 1  # contexts really differ in length


def test_acc_and_acc_norm_are_the_argmax_of_the_brute_force_scores(stories, shared_tasks):
    model, tokenizer = stories
    tasks = shared_tasks[100:112]
    right = right_norm = 0
    for t in tasks:
        lls = torch.tensor([_brute_force(model, tokenizer, t.context, e) for e in t.endings])
        lengths = torch.tensor([float(len(e)) for e in t.endings])
        right += int(lls.argmax()) == t.gold
        right_norm += int((lls / lengths).argmax()) == t.gold

    scored = hellaswag.score(model, tokenizer, tasks, batch_size=8)

    assert scored["acc"] == right / len(tasks)
    assert scored["acc_norm"] == right_norm / len(tasks)
    assert scored["acc_ci95_low"] < scored["acc"] < scored["acc_ci95_high"]


def test_a_long_context_is_cut_on_the_left(stories):
    _, tokenizer = stories
    context = "Story: " + "the cat sat on the mat. " * 40 + "then"

    full = encode_choices(tokenizer, context, ["it slept.", "it ran off."], 10_000, "test")
    cut = encode_choices(tokenizer, context, ["it slept.", "it ran off."], 64, "test")

    assert cut.endings == full.endings
    assert cut.longest == 64
    assert cut.context == full.context[len(full.context) - len(cut.context) :]
