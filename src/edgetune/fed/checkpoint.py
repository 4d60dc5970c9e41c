"""Federated checkpoints: the server state after each completed round.

    DIR/state/round-NNNNNN/algorithm.safetensors   FedAlgorithm.state_dict(), plus the
                                                   state a transport keeps for its clients
                                                   (the simulated devices' `ClientState`s)
    DIR/state/round-NNNNNN/round.json              {"round": R, "sha256": {...}}

Each round is written to `round-NNNNNN.tmp` and renamed into place; the two newest rounds
are kept, and an older one is removed only after the new one is in place, so a server
killed at any instant keeps its last complete round. round.json, written last, holds the
checksum of the tensors: resuming verifies it and falls back to the previous round when
the newest is damaged, then drops log lines of rounds after the one restored (each log
rewritten atomically, `runs.write_atomic`); `log_resume` records the resume in
resumes.jsonl. Runs written before this layout (DIR/state/{algorithm.safetensors,
round.json}) still resume.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgetune.config import build, config_diff
from edgetune.fed.algorithms.base import load_trainable
from edgetune.runs import RunDir
from edgetune.train.checkpoint import CheckpointError, sha256, swap_into_place, warn

KEEP_ROUNDS = 2
LOG_FILES = ("metrics.jsonl", "clients.jsonl", "timing.jsonl")


@dataclass
class SavedRound:
    """The round to resume from: 0 and no state when starting afresh."""

    round: int = 0
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    broken: list[Path] = field(default_factory=list)  # damaged rounds newer than `round`


def save_round(
    run: RunDir, algo: Any, rnd: int, clients: dict[str, torch.Tensor] | None = None
) -> None:
    """Persist the server state after round `rnd` (and `clients`, the transport's state
    for its clients), keeping the previous round too."""
    root = run.path / "state"
    target = root / f"round-{rnd:06d}"
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.contiguous() for k, v in {**algo.state_dict(), **(clients or {})}.items()}
    save_file(tensors, tmp / "algorithm.safetensors")
    digest = {"algorithm.safetensors": sha256(tmp / "algorithm.safetensors")}
    (tmp / "round.json").write_text(json.dumps({"round": rnd, "sha256": digest}))
    swap_into_place(tmp, target)
    for old in _round_dirs(run)[:-KEEP_ROUNDS]:
        shutil.rmtree(old, ignore_errors=True)
    for name in ("algorithm.safetensors", "round.json"):  # the single-folder layout
        (root / name).unlink(missing_ok=True)


def _round_dirs(run: RunDir) -> list[Path]:
    root = run.path / "state"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("round-*") if p.is_dir() and "." not in p.name)


def _candidates(run: RunDir) -> list[Path]:
    """Saved rounds, newest first (the single-folder layout of older runs last)."""
    legacy = run.path / "state"
    found = list(reversed(_round_dirs(run)))
    return [*found, legacy] if (legacy / "round.json").exists() else found


def _load(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """(round, tensors) of one saved round, verified."""
    try:
        info = json.loads((path / "round.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'round.json'} is unreadable: {exc}") from None
    rnd = info.get("round") if isinstance(info, dict) else None
    named = path.name == f"round-{rnd:06d}" if isinstance(rnd, int) else False
    if not isinstance(rnd, int) or rnd < 1 or not (named or path.name == "state"):
        raise CheckpointError(f"{path / 'round.json'} does not name the round of {path.name}")
    for name, expected in info.get("sha256", {}).items():
        if not (path / name).is_file() or sha256(path / name) != expected:
            raise CheckpointError(f"{path / name} is missing or fails its checksum (truncated?)")
    try:
        return rnd, load_file(path / "algorithm.safetensors")
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path} does not load: {type(exc).__name__}: {exc}") from None


def newest_round(run: RunDir) -> SavedRound:
    """The newest round state that verifies; writes nothing.

    Raises:
        CheckpointError: metrics.jsonl logs rounds beyond the first but no saved round state
            is intact, so resuming would silently start over. (A server killed between
            logging round 1 and saving it loses only that round: it starts again.)
    """
    broken: list[Path] = []
    for path in _candidates(run):
        try:
            rnd, state = _load(path)
            return SavedRound(rnd, state, broken)
        except CheckpointError as exc:
            warn(f"round state {path.name} is broken ({exc}); trying an older one")
            broken.append(path)
    completed = max((r.get("round", 0) for r in run.read_metrics()), default=0)
    if completed > 1:
        where = "every saved round state is broken" if broken else "state/ holds no round"
        raise CheckpointError(
            f"cannot resume {run.path}: it completed {completed} round(s) but {where}. Start "
            f"it over with `edgetune federate --config {run.path / 'config.yaml'} "
            f"--out {run.path} --overwrite`"
        )
    if (run.path / "metrics.jsonl").exists():
        warn(f"{run.path} holds no saved round yet; it starts again from round 0")
    return SavedRound(0, {}, broken)


def restore_round(
    run: RunDir, saved: SavedRound, algo: Any, adapter: Any, transport: Any = None
) -> int:
    """Load `saved` into the algorithm, adapter and transport, remove the damaged newer
    rounds and drop log lines of later rounds; returns the round to continue after."""
    for path in [*saved.broken, *(run.path / "state").glob("*.tmp")]:
        if path.name == "state":
            for name in ("algorithm.safetensors", "round.json"):
                (path / name).unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
    if saved.round and saved.broken:
        warn(f"resuming {run.path} from round {saved.round}, the newest intact round state")
    if saved.round:
        algo.load_state_dict(saved.state)
        load_trainable(adapter, algo.state)
        if transport is not None:
            transport.load_state_dict(saved.state)
    for file in LOG_FILES:
        # round 0 is the pre-training evaluation; with no completed round, start afresh
        run.truncate_after(saved.round or -1, file=file, key="round")
    return saved.round


def log_resume(run: RunDir, saved: SavedRound, cfg: Any) -> None:
    """Record a federated --resume in resumes.jsonl as finetune records its own (the
    round continued from, the damaged round states dropped, the settings `cfg` changes).
    Call it before the run's config.yaml is rewritten with `cfg`."""
    before = build(type(cfg), run.read_config())
    changed = {k: v for k, v in config_diff(before, cfg).items() if k != "out"}
    run.log_resume({"round": saved.round}, [p.name for p in saved.broken], changed)


def load_round(run: RunDir, algo: Any, adapter: Any, transport: Any = None) -> int:
    """Restore the newest intact round (0 if none) and trim later log lines.

    Raises:
        CheckpointError: rounds were completed but no round state is intact.
    """
    return restore_round(run, newest_round(run), algo, adapter, transport)
