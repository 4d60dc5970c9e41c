"""`edgetune federate --resume` on real stories260K federations, and the round state it
resumes from: written atomically, verified on load, never silently lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import edgetune.fed.checkpoint as fed_ckpt
from edgetune.cli import main
from edgetune.fed.checkpoint import load_round, save_round
from edgetune.runs import RunDir


@pytest.fixture
def fed_args(federate_args):
    """A seconds-long FedIT federation of 5 ZO clients on 100 SST-2 sentences."""

    def make(out: Path, *extra: str, rounds: int = 2) -> list[str]:
        return federate_args(out, "--method", "zo", *extra, rounds=rounds)

    return make


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _adapter(run: Path) -> bytes:
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


def test_a_copied_run_resumes_in_the_copy_and_more_rounds_equal_a_longer_run(tmp_path, fed_args):
    # Prepare: a 3-round reference, a 2-round run and a copy of it
    assert main(fed_args(tmp_path / "straight", rounds=3)) == 0
    original = tmp_path / "original"
    assert main(fed_args(original)) == 0
    before = _snapshot(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    # Execute
    assert main(["federate", "--resume", str(copy), "--rounds", "3"]) == 0
    # Assert: the original is untouched; the copy equals the 3-round run
    assert _snapshot(original) == before
    assert _adapter(copy) == _adapter(tmp_path / "straight")
    assert (copy / "metrics.jsonl").read_bytes() == (
        tmp_path / "straight" / "metrics.jsonl"
    ).read_bytes()
    assert json.loads((copy / "summary.json").read_text())["rounds"] == 3


def _reproducible(clients: Path) -> list[dict]:
    """clients.jsonl without the measured peak memory (not reproducible)."""
    rows = RunDir(clients.parent, resume=True).read_metrics(clients.name)
    return [{k: v for k, v in row.items() if k != "peak_rss_mb"} for row in rows]


def test_a_torn_log_line_resumes_to_the_uninterrupted_federation(
    tmp_path, fed_args, capsys, run_torn
):
    # Prepare: a 3-round reference, and a federation killed half-way through logging
    # round 3 (round 2 is its newest saved state)
    assert main(fed_args(tmp_path / "straight", "--threads", "1", rounds=3)) == 0
    run = tmp_path / "torn"
    run_torn(fed_args(run, "--threads", "1", rounds=3), "metrics.jsonl", "round", 3)
    capsys.readouterr()
    # Execute
    assert main(["federate", "--resume", str(run), "--threads", "1"]) == 0
    # Assert: the torn line reported and dropped; the result is the uninterrupted run's
    err = capsys.readouterr().err
    assert f"{run / 'metrics.jsonl'}: dropped its last line" in err
    assert _adapter(run) == _adapter(tmp_path / "straight")
    assert (run / "metrics.jsonl").read_bytes() == (
        tmp_path / "straight" / "metrics.jsonl"
    ).read_bytes()
    assert _reproducible(run / "clients.jsonl") == _reproducible(
        tmp_path / "straight" / "clients.jsonl"
    )
    (resume,) = RunDir(run, resume=True).read_metrics("resumes.jsonl")
    assert resume.pop("wall_s_before") > 0  # the killed call's time, carried forward
    assert resume == {"round": 2, "dropped": [], "changed": {}}


def test_a_resume_that_changes_the_rounds_is_logged_like_finetunes(tmp_path, fed_args):
    run = tmp_path / "run"
    assert main(fed_args(run, "--threads", "1")) == 0
    assert main(["federate", "--resume", str(run), "--rounds", "3", "--threads", "1"]) == 0
    (resume,) = RunDir(run, resume=True).read_metrics("resumes.jsonl")
    assert resume.pop("wall_s_before") > 0  # the first call's wall time
    assert resume == {"round": 2, "dropped": [], "changed": {"fed.rounds": [2, 3]}}


REFUSED = [
    (["fed.clients=6"], "fed.clients"),
    (["--clients", "6"], "fed.clients"),
    (["seed=7"], "seed"),
    (["--algorithm", "fedkseed"], "fed.algorithm"),
    (["--local-steps", "5"], "fed.local_steps"),
    (["peft.rank=4"], "peft.rank"),
    (["--lr", "0.5"], "optim.lr"),
    (["--rounds", "1"], "fed.rounds"),  # fewer than the 2 rounds done
    (["--out", "elsewhere"], "--out"),
]


def test_settings_that_shaped_the_federation_are_refused_and_nothing_is_written(
    tmp_path, fed_args, capsys
):
    run = tmp_path / "run"
    assert main(fed_args(run)) == 0
    before = _snapshot(run)
    capsys.readouterr()
    for extra, key in REFUSED:
        status = main(["federate", "--resume", str(run), *extra])
        err = capsys.readouterr().err
        assert status == 2, extra
        assert key in err and "Traceback" not in err, (extra, err)
        assert _snapshot(run) == before, extra


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated state": lambda d: _truncate(d / "algorithm.safetensors"),
    "bad round.json": lambda d: (d / "round.json").write_text('{"round": '),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_round_falls_back_to_the_previous_round(
    tmp_path, fed_args, capsys, damage
):
    # Prepare
    run = tmp_path / "run"
    assert main(fed_args(run)) == 0
    adapter, metrics = _adapter(run), (run / "metrics.jsonl").read_bytes()
    DAMAGE[damage](run / "state" / "round-000002")
    capsys.readouterr()
    # Execute
    assert main(["federate", "--resume", str(run)]) == 0
    # Assert: a visible warning; round 2 runs again to the same result
    err = capsys.readouterr().err
    assert "round-000002 is broken" in err and "from round 1" in err
    assert _adapter(run) == adapter
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert sorted(p.name for p in (run / "state").iterdir()) == ["round-000001", "round-000002"]


def test_a_federation_whose_state_was_deleted_is_not_silently_restarted(tmp_path, fed_args, capsys):
    run = tmp_path / "run"
    assert main(fed_args(run)) == 0
    shutil.rmtree(run / "state")
    before = _snapshot(run)
    capsys.readouterr()
    assert main(["federate", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "completed 2 round(s)" in err and "--overwrite" in err and "Traceback" not in err
    assert _snapshot(run) == before


@pytest.fixture
def fedit(stories260k_path, shared_data):
    """A FedIT server (real algorithm on a real stories260K LoRA adapter)."""
    del shared_data
    from edgetune import models
    from edgetune.fed.algorithms.fedit import FedIT
    from edgetune.fed.config import FedConfig
    from edgetune.peft import PeftConfig, attach

    model, _ = models.load(str(stories260k_path))
    adapter = attach(model, PeftConfig(), seed=0)
    return FedIT(FedConfig(), adapter), adapter


def _at_round(algo, value: float) -> None:
    for tensor in algo.state.values():
        tensor.fill_(value)


def _logged_rounds(run: RunDir, rounds: int) -> None:
    for rnd in range(rounds + 1):
        run.log({"round": rnd, "loss": 1.0})


class _Killed(Exception):
    pass


def _kill_at(k: int, monkeypatch: pytest.MonkeyPatch, fn) -> bool:
    """Call `fn` with its k-th file operation (0-based) raising before it runs, as a kill
    would leave the disk; True when it was killed."""
    ops = [
        (shutil, "rmtree"),
        (Path, "rename"),
        (Path, "mkdir"),
        (Path, "write_text"),
        (Path, "unlink"),
        (fed_ckpt, "save_file"),
    ]
    count = [0]

    def killing(real):
        def op(*args, **kwargs):
            if count[0] == k:
                raise _Killed
            count[0] += 1
            return real(*args, **kwargs)

        return op

    with monkeypatch.context() as m:
        for owner, name in ops:
            m.setattr(owner, name, killing(getattr(owner, name)))
        try:
            fn()
        except _Killed:
            return True
    return False


def test_a_server_killed_at_any_point_of_saving_resumes_from_a_complete_round(
    tmp_path, fedit, monkeypatch
):
    # save_round used to delete state/ before renaming the new one in place: a kill in
    # that gap made the next resume start again from round 0.
    algo, adapter = fedit
    k = 0
    while True:
        # Prepare: round 1 saved, round 2 logged, the save of round 2 killed at operation k
        run = RunDir(tmp_path / f"kill-{k}")
        _logged_rounds(run, 2)
        _at_round(algo, 1.0)
        save_round(run, algo, 1)
        _at_round(algo, 2.0)
        killed = _kill_at(k, monkeypatch, lambda run=run: save_round(run, algo, 2))
        # Execute
        _at_round(algo, 0.0)
        rnd = load_round(run, algo, adapter)
        # Assert: round 1 or 2 restored whole, and the log cut to it
        assert rnd in (1, 2) if killed else rnd == 2, f"kill at operation {k}"
        assert all(torch.equal(t, torch.full_like(t, float(rnd))) for t in algo.state.values())
        assert [r["round"] for r in run.read_metrics()] == list(range(rnd + 1))
        if not killed:
            break
        k += 1
    assert k >= 5  # every gap of the save was tried


def test_two_rounds_are_kept_and_the_older_single_folder_layout_still_resumes(tmp_path, fedit):
    algo, adapter = fedit
    run = RunDir(tmp_path / "run")
    _logged_rounds(run, 4)
    # a run saved by an older edgetune: state/{algorithm.safetensors,round.json}
    (run.path / "state").mkdir()
    _at_round(algo, 2.0)
    save_file(algo.state_dict(), run.path / "state" / "algorithm.safetensors")
    (run.path / "state" / "round.json").write_text(json.dumps({"round": 2}))
    _at_round(algo, 0.0)
    assert load_round(run, algo, adapter) == 2
    assert all(torch.equal(t, torch.full_like(t, 2.0)) for t in algo.state.values())
    for rnd in (3, 4):
        _at_round(algo, float(rnd))
        save_round(run, algo, rnd)
    assert sorted(p.name for p in (run.path / "state").iterdir()) == [
        "round-000003",
        "round-000004",
    ]
