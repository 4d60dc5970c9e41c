"""Thread counts: the default rule (a pure function of cores, load, processes and model
size), where a count comes from, and that `--threads` reaches torch in a real CLI run and
the environment of the processes edgetune starts."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from edgetune import threads
from edgetune.cli import main
from edgetune.errors import ConfigError
from edgetune.recipes.finetune import run_in_subprocess


@pytest.mark.parametrize(
    "cores, busy, processes, tiny, expected",
    [
        (2, 0.0, 1, False, 2),  # quiet machine: every core
        (2, 0.4, 1, False, 2),  # a neighbour under half a core does not take one
        (2, 0.6, 1, False, 1),  # ... over half a core does (2 threads: 3.32 s, 1: 2.17 s)
        (2, 1.0, 1, False, 1),
        (2, 2.0, 1, False, 1),  # everything busy: still 1
        (2, 0.0, 2, False, 1),  # two local SuperNodes on 2 cores: 1 each, not 2 each
        (16, 3.2, 4, False, 3),  # 13 free cores among 4 processes
        (8, 0.0, 3, False, 2),
        (8, 0.0, 16, False, 1),  # more processes than cores: at least 1
        (8, 0.0, 1, True, 1),  # tiny model: 1 thread even on a quiet machine
        (2, -0.1, 1, False, 2),  # a sampling artefact below zero counts as quiet
    ],
)
def test_default_rule(cores, busy, processes, tiny, expected):
    assert threads.choose_threads(cores, busy, processes, tiny) == expected


def test_split_shares_a_budget_among_processes():
    assert [threads.split(4, n) for n in (1, 2, 3, 4, 5)] == [4, 2, 1, 1, 1]


def test_tiny_models_are_told_by_their_weights(stories260k_path, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    with (big / "model.safetensors").open("wb") as f:  # sparse: no disk used
        f.truncate(threads.TINY_MODEL_BYTES + 1)
    assert threads.is_tiny(str(stories260k_path))  # 1 MB of weights
    assert not threads.is_tiny(str(big))
    assert not threads.is_tiny("smollm2-135m") and not threads.is_tiny(None)
    assert not threads.is_tiny(str(tmp_path / "nowhere"))


def test_where_a_count_comes_from(monkeypatch, stories260k_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.resolve(2) == threads.Threads(2, "--threads")
    assert threads.resolve(None) == threads.Threads(3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.resolve(None, str(stories260k_path)) == threads.Threads(1, "auto: tiny model")
    auto = threads.resolve(None, "smollm2-135m")
    assert auto.source.startswith(f"auto: {os.cpu_count()} cores")
    assert 1 <= auto.count <= (os.cpu_count() or 1)


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_a_bad_omp_num_threads_is_refused(monkeypatch, value):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS=.* is not a positive integer"):
        threads.resolve(None)


def _tiny_finetune(stories260k_path, out, *extra):
    return [
        "finetune",
        "--model",
        str(stories260k_path),
        "--dataset",
        "sst2",
        "--method",
        "zo",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--out",
        str(out),
        "data.train_size=32",
        "data.eval_size=8",
        "data.max_length=32",
        "train.progress=false",
        *extra,
    ]


@pytest.fixture
def two_threads(monkeypatch):
    """This process at 2 threads and OMP_NUM_THREADS=2, restored afterwards."""
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MKL_NUM_THREADS", "2")
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_threads_flag_reaches_torch_the_config_and_child_processes(
    tmp_path, stories260k_path, shared_data, two_threads
):
    del shared_data
    # Execute: a real CLI run with --threads 1, then a child run started from this process
    assert main(_tiny_finetune(stories260k_path, tmp_path / "run", "--threads", "1")) == 0
    in_process = torch.get_num_threads()
    env = os.environ["OMP_NUM_THREADS"], os.environ["MKL_NUM_THREADS"]
    child = tmp_path / "child"
    run_in_subprocess(child, str(stories260k_path), _tiny_finetune(stories260k_path, child)[3:])
    # Assert: torch ran on 1 thread, the run recorded it, and the child inherited it
    assert in_process == 1 and env == ("1", "1")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["threads"] == 1
    assert yaml.safe_load((child / "config.yaml").read_text())["threads"] == 1


def test_the_config_sets_threads_and_a_resumed_run_keeps_them(
    tmp_path, stories260k_path, shared_data, two_threads
):
    del shared_data
    run = tmp_path / "run"
    args = _tiny_finetune(stories260k_path, run, "threads=1", "train.checkpoint_every=1")
    assert main(args) == 0
    assert torch.get_num_threads() == 1
    # resumed with OMP_NUM_THREADS=2 around it: the recorded count wins
    torch.set_num_threads(2)
    os.environ["OMP_NUM_THREADS"] = "2"
    assert main(["finetune", "--resume", str(run)]) == 0
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--threads", "-1"], "--threads: expected a whole number of threads >= 1"),
        (["threads=-3"], "threads: expected a whole number of threads >= 1"),
    ],
)
def test_a_negative_thread_count_is_refused(
    tmp_path, stories260k_path, capsys, extra, message, two_threads
):
    status = main(_tiny_finetune(stories260k_path, tmp_path / "run", *extra))
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_every_command_that_runs_a_model_takes_threads(capsys):
    from edgetune.cli import build_parser

    parser = build_parser()
    commands = [
        ["finetune"],
        ["federate"],
        ["eval"],
        ["generate", "--prompt", "x"],
        ["demo"],
        ["bench", "zo"],
        ["flower", "up", "--clients", "1"],
        ["flower", "run"],
    ]
    for command in commands:
        assert parser.parse_args([*command, "--threads", "3"]).threads == 3, command
