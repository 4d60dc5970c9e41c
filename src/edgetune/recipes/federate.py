"""`edgetune federate`: federated fine-tuning over a simulated heterogeneous fleet.

setup (`fed/session.py`: model, data split into client partitions, adapter, fleet) ->
the rounds (`fed/rounds.py`) of the chosen algorithm over the in-process fleet ->
global adapter and summary. The round loop and the algorithm objects are the ones a
Flower deployment runs; only the transport differs.

Run directory: config.yaml, metrics.jsonl (one line per round: `round`, `loss`, bytes,
simulated seconds, accepted/rejected, `eval/*`), clients.jsonl (per client per round:
device, method, rank, status, bytes, simulated seconds), summary.json (`bytes_up`,
`bytes_down`, `rounds`, `sim_s`, final `eval/*`), adapter/, and state/ for --resume
(resumes.jsonl: one line per --resume, as finetune writes).
"""

from __future__ import annotations

import time

from edgetune import track
from edgetune.config import to_dict
from edgetune.fed.config import RESUME_MAY_CHANGE, FederateConfig
from edgetune.fed.session import partition_for, resume_point, setup, summarize
from edgetune.runs import RunDir
from edgetune.train.checkpoint import check_saved_rank

__all__ = ["RESUME_MAY_CHANGE", "FederateConfig", "partition_for", "run"]


def run(cfg: FederateConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Federate and write the run directory; returns the summary."""
    from edgetune.fed.algorithms import build_algorithm
    from edgetune.fed.checkpoint import log_resume, restore_round
    from edgetune.fed.rounds import InProcessFleet, run_rounds

    start = time.perf_counter()
    track.require(cfg.report_to)  # a missing tracker package stops here, before any work
    rundir = RunDir(cfg.out, resume=resume, overwrite=overwrite)
    saved = resume_point(rundir, cfg) if resume else None
    if saved is not None:
        where = rundir.path / "state" / f"round-{saved.round:06d}"  # (or an older layout's)
        where = where if where.is_dir() else where.parent
        check_saved_rank(saved.state, cfg.peft, where, rundir.path / "config.yaml")
        log_resume(rundir, saved, cfg)
    rundir.write_config(to_dict(cfg))
    fed = setup(cfg)
    rundir.write_config(to_dict(fed.cfg))  # says which partition `auto` chose, labels used...
    cfg = fed.cfg
    algo = build_algorithm(fed)
    fleet = InProcessFleet(fed, algo)
    done = restore_round(rundir, saved, algo, fed.adapter, fleet) if saved is not None else 0
    rundir.track(cfg.report_to, to_dict(cfg))  # after the resume dropped the rounds it redoes
    planner = algo.planner(fed)
    totals = run_rounds(
        fed, algo, fleet, rundir, planner=planner, start=done, progress=cfg.train.progress
    )
    return summarize(fed, rundir, totals, planner.methods(fed.fleet), start, algo=algo)
