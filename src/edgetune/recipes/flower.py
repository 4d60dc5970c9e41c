"""`edgetune flower up|run`: real federations on Flower.

`up` starts a SuperLink and N SuperNodes on 127.0.0.1 and keeps them until Ctrl-C.
`run` writes the same run directory as `edgetune federate` (config.yaml first, its local
paths made absolute, then the ServerApp fills metrics.jsonl, clients.jsonl, state/,
adapter/, summary.json) and renders the report; `--local N` brings up N SuperNodes for
the run and stops them afterwards. Settings only the simulator honours (the simulated
clock, attacks) are refused before anything starts.
Both start with TLS and SuperNode authentication (keys in HOME/certs) unless `--insecure`,
and share the command's `--threads` among the SuperNodes.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetune import threads, track
from edgetune.config import absolute_paths, option, to_dict
from edgetune.errors import ConfigError, EdgetuneError
from edgetune.fed.checkpoint import log_resume
from edgetune.fed.config import check_read_by_flower
from edgetune.fed.session import resume_point
from edgetune.runs import RunDir, check_out


@dataclass
class UpConfig:
    """Everything `edgetune flower up` needs: the local federation it starts."""

    clients: int = option(0, "number of SuperNodes (at least 1)", flag="--clients")
    home: str = option("runs/flower-home", "FLWR_HOME (config.toml, logs)", flag="--home")
    port: int = option(0, "SuperLink port (0 = a free one)", flag="--port")
    devices: str = option(
        "", "device profiles of the nodes, comma-separated, cycled ('' = jetson)", flag="--devices"
    )
    tls: str = option(
        "",
        "certificates from `edgetune flower certs` ('' = generated into HOME/certs)",
        flag="--tls",
    )
    auth: str = option(
        "",
        "SuperNode keys from `flower certs --nodes N` ('' = generated into HOME/certs/keys)",
        flag="--auth",
    )
    insecure: bool = option(
        False, "no TLS and no SuperNode authentication (loopback tests only)", flag="--insecure"
    )
    threads: int = option(0, "threads shared by the SuperNodes (0 = chosen from the free cores)")

    def __post_init__(self) -> None:
        threads.check(self.threads, "threads")
        if self.clients < 1:
            raise ConfigError(
                f"clients: a local federation needs at least one SuperNode, not {self.clients}: "
                "pass --clients 1 or more"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(
                f"port: expected a port in 0..65535 (0 = a free one), got {self.port}; pass "
                "--port 0 to pick a free one"
            )


def _federation(args: Any, clients: int) -> Any:
    from edgetune.flower.local import LocalFederation

    check_out(args.home, "--home")  # before any process starts
    return LocalFederation(
        Path(args.home),
        clients,
        devices=[d for d in (args.devices or "").split(",") if d],
        tls=Path(args.tls).resolve() if args.tls else None,
        port=getattr(args, "port", 0),
        auth=Path(args.auth).resolve() if args.auth else None,
        insecure=args.insecure,
        threads=args.threads or 0,
    )


def _refuse_local_flags_without_local(args: Any) -> None:
    """--devices, --tls, --auth and --insecure describe the local SuperNodes: refuse them
    when the run goes to an existing federation, where they would be ignored."""
    given = [f"--{name}" for name in ("devices", "tls", "auth", "insecure") if getattr(args, name)]
    if given and not args.local:
        raise EdgetuneError(
            f"{', '.join(given)} only apply to a federation started for the run: add "
            "--local N, or set them where the SuperLink and SuperNodes are started "
            "(`edgetune flower up`, docs/deploy.md)"
        )


def up(cfg: UpConfig) -> int:
    """Start the local federation and keep it until Ctrl-C (or SIGTERM)."""
    fed = _federation(cfg, cfg.clients).start()
    # before the banner: a SIGTERM sent as soon as the banner is read (a supervisor, the
    # test suite under load) must stop the processes, not kill this one and orphan them
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        security = (
            "INSECURE (no TLS, no SuperNode authentication)"
            if fed.insecure
            else f"TLS with {fed.tls / 'ca.crt'}, SuperNode keys in {fed.auth}"
        )
        print(
            f"SuperLink on {fed.address} with {cfg.clients} SuperNodes; FLWR_HOME={fed.home} "
            f"(connection {'edgetune-local'!r}, logs in {fed.home / 'logs'}).\n"
            f"Security: {security}. Threads: {fed.node_threads} per SuperNode.\n"
            f"Run: edgetune flower run --home {cfg.home} ...   Stop: Ctrl-C",
            flush=True,
        )
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

    _refuse_local_flags_without_local(args)
    check_read_by_flower(cfg)
    track.require(cfg.report_to)  # the ServerApp mirrors the rounds; refuse before launch
    resume = bool(args.resume)
    rundir = RunDir(cfg.out, resume=resume, overwrite=args.overwrite)
    if resume:
        # refuse before anything starts; the ServerApp restores the same round
        log_resume(rundir, resume_point(rundir, cfg), absolute_paths(cfg))
    # The ServerApp and the ClientApps start in other working directories.
    rundir.write_config(to_dict(absolute_paths(cfg)))
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
