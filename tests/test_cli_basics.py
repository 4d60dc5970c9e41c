"""The first commands a new user types: `--version`, `python -m edgetune`, and a default
run whose stderr holds edgetune's own progress only (library noise needs `--verbose`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import edgetune
from edgetune.cli import main

QUIET_ENV = (
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "TRANSFORMERS_VERBOSITY",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS",
)


def _edgetune(*args: str) -> subprocess.CompletedProcess:
    """`python -m edgetune ARGS` in a fresh process (importing this checkout)."""
    # Without what an earlier in-process quiet run put into this process's environment.
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    env["PYTHONPATH"] = str(Path(edgetune.__file__).parents[1])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "edgetune", *args], capture_output=True, text=True, env=env
    )


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"edgetune {edgetune.__version__}"


def test_python_dash_m_edgetune_runs_the_cli():
    result = _edgetune("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"edgetune {edgetune.__version__}"


def _finetune(out: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    return _edgetune(
        *extra,
        "finetune",
        "--model",
        str(model),
        "--dataset",
        "sst2",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "data.train_size=8",
        "data.eval_size=4",
        "data.max_length=32",
        "train.progress=false",
    )


def test_library_noise_is_hidden_unless_verbose(tmp_path, stories260k_path, shared_data):
    del shared_data
    quiet = _finetune(tmp_path / "quiet", stories260k_path)
    loud = _finetune(tmp_path / "loud", stories260k_path, "--verbose")

    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert quiet.stderr == ""
    # The same run with --verbose shows what was hidden (so the check above can fail).
    assert "Loading weights" in loud.stderr
    assert "is_gradient_checkpointing" in loud.stderr


@pytest.mark.parametrize(
    "command, flags, expect",
    [
        (["finetune"], ["--steps", "7", "--method", "zo", "zo.queries=2"], "steps: 7"),
        (["federate"], ["--algorithm", "fedkseed", "--method", "zo", "--rounds", "3"], "rounds: 3"),
        (["flower", "run"], ["--rounds", "4", "fed.clients=3"], "clients: 3"),
        (["compress"], ["--prune", "0.3", "--recover", "zo"], "ratio: 0.3"),
        (["export"], ["--format", "gguf", "--gguf-type", "q8_0"], "gguf_type: q8_0"),
        (["ondevice"], ["--runtime", "ort", "--steps", "5"], "runtime: ort"),
        (["generate"], ["--prompt", "Once upon", "--chat"], "chat: true"),
        (["eval"], ["--dataset", "sst2", "--eval-size", "3", "--out", "e"], "eval_size: 3"),
        (["eval"], ["some/run", "--seed", "2"], "run: some/run"),
        (["flower", "up"], ["--clients", "2", "--devices", "phone,pi"], "devices: phone,pi"),
    ],
)
def test_print_config_loads_back_with_config_to_the_same_run(
    tmp_path, capsys, monkeypatch, command, flags, expect
):
    monkeypatch.chdir(tmp_path)
    # Execute: print the resolved config, then load it back and print again
    assert main([*command, *flags, "--print-config"]) == 0
    printed = capsys.readouterr().out
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert main([*command, "--config", str(saved), "--print-config"]) == 0
    # Assert: the same config, with the flags in it, and nothing run or written
    assert capsys.readouterr().out == printed
    assert expect in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["printed.yaml"]
