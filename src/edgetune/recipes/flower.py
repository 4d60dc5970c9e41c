"""`edgetune flower up|run`: real federations on Flower.

`up` starts a SuperLink and N SuperNodes on 127.0.0.1 and keeps them until Ctrl-C.
`run` writes the same run directory as `edgetune federate` (config.yaml first, then the
ServerApp fills metrics.jsonl, clients.jsonl, state/, adapter/, summary.json) and renders
the report; `--local N` brings up N SuperNodes for the run and stops them afterwards.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

from edgetune.config import to_dict
from edgetune.recipes.federate import resume_point
from edgetune.runs import RunDir


def _federation(args: Any, clients: int) -> Any:
    from edgetune.flower.local import LocalFederation

    devices = [d for d in (args.devices or "").split(",") if d]
    tls = Path(args.tls).resolve() if args.tls else None
    auth = Path(args.auth).resolve() if args.auth else None
    return LocalFederation(Path(args.home), clients, devices, tls, getattr(args, "port", 0), auth)


def up(args: Any) -> int:
    """Start the local federation and keep it until Ctrl-C (or SIGTERM)."""
    fed = _federation(args, args.clients).start()
    print(
        f"SuperLink on {fed.address} with {args.clients} SuperNodes; FLWR_HOME={fed.home} "
        f"(connection {'edgetune-local'!r}, logs in {fed.home / 'logs'}).\n"
        f"Run: edgetune flower run --home {args.home} ...   Stop: Ctrl-C",
        flush=True,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while all(p.poll() is None for p in fed.procs.values()):
            time.sleep(1.0)
        print("a Flower process exited; stopping the others", flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        fed.stop()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run(cfg: Any, args: Any) -> dict:
    """Run the federation in `cfg` on Flower; returns the summary."""
    from edgetune.flower.local import CONNECTION, launch
    from edgetune.report.federated import render

    resume = bool(args.resume)
    rundir = RunDir(cfg.out, resume=resume, overwrite=args.overwrite)
    if resume:
        resume_point(rundir, cfg)  # refuse before anything starts; the ServerApp restores
    rundir.write_config(to_dict(cfg))
    options = {
        "resume": resume,
        "round_timeout": args.round_timeout,
        "wait_nodes": args.wait_nodes,
    }
    if args.local:
        with _federation(args, args.local) as fed:
            launch(rundir.path, fed.home, CONNECTION, **options)
    else:
        launch(rundir.path, Path(args.home), args.connection or "", **options)
    render(rundir.path)
    return json.loads((rundir.path / "summary.json").read_text())
