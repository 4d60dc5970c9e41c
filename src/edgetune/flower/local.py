"""Start and stop a Flower federation on this machine, and launch edgetune runs on it.

`LocalFederation` starts one SuperLink and N SuperNodes bound to 127.0.0.1 (SuperNode i
gets `partition-id=i` and a device profile), writes the `flwr` connection into
`HOME/config.toml`, and stops every process it started by PID. Flower telemetry and
update checks are switched off in all of them.

Beside each SuperNode runs an edgetune worker (`edgetune.flower.worker`, process name
`worker-I`, log `HOME/logs/worker-I.log`) that keeps the model and data between messages;
the SuperNode's node config names its socket (`worker="..."`), and its ClientApps
forward their training to it. The sockets live in `HOME/workers/node-I.sock`; a Unix
socket path must stay under about 104 bytes, so when HOME is too deep they go to a fresh
folder `/tmp/edgetune-workers-XXXXXXXX` (mode 0700, removed on stop) and `worker_dir` says which.
Flower's own polling is shortened where Flower lets it be set (`FAST_POLLING`).

Secure by default: TLS with test certificates and SuperNode authentication with one key
per node, generated into HOME/certs (kept and reused on the next start) unless given;
`insecure=True` is the explicit opt-out for loopback trials. Threads: the federation has
a budget of torch threads (`edgetune.threads`); the SuperLink (whose ServerApp evaluates
while the nodes wait) gets all of it, each SuperNode an equal share.

`launch` runs `flwr run` on edgetune's Flower app for a run directory whose config.yaml
is already written, streams the server's log, and returns when the run ends. `flwr run`
exits 0 even when the ServerApp raised, so the ServerApp leaves its error in
`RUN/SERVER_ERROR` and `launch` raises it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgetune import threads
from edgetune.errors import EdgetuneError
from edgetune.flower.certs import (
    TLS_FILES,
    ensure_supernode_keys,
    ensure_test_certificates,
    private_dir,
)
from edgetune.flower.channel import SOCKET_PATH_MAX
from edgetune.flower.worker import WorkerError, ping

APP_DIR = Path(__file__).parent / "app"
CONNECTION = "edgetune-local"
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
# The SuperExec asks its SuperNode (or SuperLink) for a new app process to start once a
# second by default; on loopback asking every 0.1 s costs nothing and saves up to 0.9 s
# per message. (The SuperNode's 3 s pull loop and the ServerApp grid's 3 s reply poll are
# fixed in Flower 1.41.)
FAST_POLLING = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
WORKER_START_S = 60.0
SERVER_ERROR = "server-error.txt"  # in the run directory: why the ServerApp stopped


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, no telemetry, this venv's
    executables first on PATH (the SuperLink starts `flower-superexec` by name)."""
    bindir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        **QUIET,
        **FAST_POLLING,
        "FLWR_HOME": str(home),
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    """Until something accepts connections on 127.0.0.1:port (or the process dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EdgetuneError(f"Flower process exited with {proc.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise EdgetuneError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s; see {log}")


@dataclass
class LocalFederation:
    """A SuperLink and `clients` SuperNodes on loopback.

    Attributes:
        home: FLWR_HOME for every process (config.toml, logs/, apps).
        clients: number of SuperNodes (partition ids 0..clients-1).
        devices: device profile per SuperNode (cycled; "" = the run's fleet decides).
        tls: folder with ca.crt, server.pem and server.key (from `write_test_certificates`);
            None = test certificates in HOME/certs (generated when missing).
        port: the SuperLink's port (0 = pick a free one).
        auth: folder with SuperNode keys node-I / node-I.pub (from `write_supernode_keys`):
            the SuperLink admits only registered SuperNodes, and each is registered and
            started with its key; None = keys in HOME/certs/keys (generated when missing).
        insecure: no TLS and no SuperNode authentication (loopback trials only); cannot be
            combined with `tls` or `auth`.
        threads: torch threads for this federation's processes (0 = `threads.resolve()`):
            the SuperLink all of them, each SuperNode and its worker
            `threads.split(threads, clients)`.
        workers: start an edgetune worker beside each SuperNode (False = the ClientApps
            train in their own per-message processes).
    """

    home: Path
    clients: int
    devices: list[str] = field(default_factory=list)
    tls: Path | None = None
    port: int = 0
    auth: Path | None = None
    insecure: bool = False
    threads: int = 0
    workers: bool = True
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    worker_dir: Path | None = None

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()
        self.port = self.port or free_port()
        self.check()
        self.threads = self.threads or threads.resolve().count
        private_dir(self.home)
        if not self.insecure:
            certs = self.home / "certs"
            self.tls = self.tls or ensure_test_certificates(certs)
            self.auth = self.auth or ensure_supernode_keys(certs / "keys", self.clients)
        (self.home / "logs").mkdir(exist_ok=True)

    def check(self) -> None:
        """Refuse, before starting anything, a federation that cannot come up."""
        if self.clients < 1:
            raise EdgetuneError(
                f"a local federation needs at least one SuperNode, not {self.clients}: "
                "pass --clients 1 or more"
            )
        threads.check(self.threads)
        if self.insecure and (self.tls is not None or self.auth is not None):
            given = " and ".join(f for f, v in (("--tls", self.tls), ("--auth", self.auth)) if v)
            raise EdgetuneError(
                f"--insecure turns TLS and SuperNode authentication off, but {given} was "
                f"given: drop --insecure to use them, or drop {given} for an insecure trial"
            )
        if self.tls is not None:
            missing = [f for f in TLS_FILES if not (self.tls / f).is_file()]
            if missing:
                raise EdgetuneError(
                    f"TLS folder {self.tls} lacks {', '.join(missing)}: create it with "
                    f"`edgetune flower certs {self.tls}`"
                )
        if self.auth is not None:
            keys = [f"node-{i}{ext}" for i in range(self.clients) for ext in ("", ".pub")]
            missing = [k for k in keys if not (self.auth / k).is_file()]
            if missing:
                raise EdgetuneError(
                    f"SuperNode key folder {self.auth} lacks {', '.join(missing[:4])}"
                    f"{' ...' if len(missing) > 4 else ''} for {self.clients} SuperNodes: "
                    f"create them with `edgetune flower certs DIR --nodes {self.clients}` "
                    "and pass --auth DIR/keys"
                )

    @property
    def node_threads(self) -> int:
        """Threads each SuperNode's training uses: its share of the federation's threads."""
        return threads.split(self.threads, self.clients)

    @property
    def address(self) -> str:
        """host:port of the SuperLink."""
        return f"127.0.0.1:{self.port}"

    def security(self, role: str) -> list[str]:
        """TLS (or --insecure) flags for `role` = superlink | supernode."""
        if self.tls is None:  # only with insecure: __post_init__ fills it otherwise
            return ["--insecure"]
        if role == "superlink":
            return [
                "--ssl-ca-certfile",
                str(self.tls / "ca.crt"),
                "--ssl-certfile",
                str(self.tls / "server.pem"),
                "--ssl-keyfile",
                str(self.tls / "server.key"),
            ]
        return ["--root-certificates", str(self.tls / "ca.crt")]

    def start(self) -> LocalFederation:
        """Start the SuperLink, then the SuperNodes; write the flwr connection. If any
        step fails, stop what was already started before raising."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> LocalFederation:
        self.write_connection()
        self.spawn(
            "superlink",
            [
                "flower-superlink",
                *self.security("superlink"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
                *(["--enable-supernode-auth"] if self.auth else []),
            ],
        )
        wait_for_port(self.port, 60, self.procs["superlink"], self.log("superlink"))
        for i in range(self.clients):
            if self.auth is not None:
                self.register(self.auth / f"node-{i}.pub")
            self.start_node(i)
        return self

    def register(self, public_key: Path) -> None:
        """Admit the SuperNode holding the private half of `public_key`."""
        done = subprocess.run(
            ["flwr", "supernode", "register", str(public_key), CONNECTION],
            env=flower_env(self.home),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip() or f"exit status {done.returncode}"
            raise EdgetuneError(f"flwr supernode register {public_key} failed: {output}")

    def start_node(
        self, i: int, root_certificates: Path | None = None, key: Path | None = None
    ) -> subprocess.Popen:
        """Start SuperNode i (its partition id is i), with the CA and auth key of this
        federation unless others are given."""
        device = self.devices[i % len(self.devices)] if self.devices else ""
        node_config = f"partition-id={i}" + (f' device="{device}"' if device else "")
        if self.workers:
            node_config += f' worker="{self.start_worker(i)}"'
        security = self.security("supernode")
        if root_certificates is not None:
            security = ["--root-certificates", str(root_certificates)]
        key = key or (self.auth / f"node-{i}" if self.auth else None)
        if key is not None:
            security += ["--auth-supernode-private-key", str(key)]
        port = free_port()
        return self.spawn(
            f"supernode-{i}",
            [
                "flower-supernode",
                *security,
                "--superlink",
                self.address,
                "--port",
                str(port),
                "--node-config",
                node_config,
                "--max-retries",
                "3",
                "--max-wait-time",
                "20",
            ],
        )

    def worker_socket(self, i: int) -> Path:
        """Where SuperNode i's worker listens: HOME/workers/node-I.sock, or a short folder
        under /tmp (made once, mode 0700) when that path is too long for a Unix socket."""
        if self.worker_dir is None:
            self.worker_dir = self.home / "workers"
            longest = self.worker_dir / f"node-{max(self.clients, i + 1) - 1}.sock"
            if len(os.fsencode(longest)) < SOCKET_PATH_MAX:
                private_dir(self.worker_dir)
            else:
                self.worker_dir = Path(tempfile.mkdtemp(prefix="edgetune-workers-"))
        return self.worker_dir / f"node-{i}.sock"

    def start_worker(self, i: int) -> Path:
        """Start SuperNode i's worker with the SuperNode's thread share and wait until it
        answers; its socket path. A worker still running is kept (a restarted SuperNode
        finds its warm session)."""
        path = self.worker_socket(i)
        name = f"worker-{i}"
        if name in self.procs and self.procs[name].poll() is None:
            return path
        argv = [sys.executable, "-m", "edgetune.flower.worker", "--socket", str(path)]
        proc = self.spawn(name, [*argv, "--threads", str(self.node_threads)])
        deadline = time.monotonic() + WORKER_START_S
        while True:
            if proc.poll() is not None:
                raise EdgetuneError(
                    f"the edgetune worker of SuperNode {i} exited with {proc.returncode}; "
                    f"see {self.log(name)}"
                )
            try:
                ping(path, timeout=2.0)
                return path
            except WorkerError:
                if time.monotonic() > deadline:
                    raise EdgetuneError(
                        f"the edgetune worker of SuperNode {i} did not answer on {path} "
                        f"within {WORKER_START_S:.0f} s; see {self.log(name)}"
                    ) from None
                time.sleep(0.1)

    def env(self, name: str) -> dict[str, str]:
        """Environment of process `name`: Flower's, with its torch threads. SuperNodes and
        their workers share the federation's threads, since several PyTorch processes each
        spinning on every core run many times slower; ClientApps inherit the setting."""
        count = self.node_threads if name.startswith(("supernode", "worker")) else self.threads
        return threads.child_env(count, flower_env(self.home))

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        """Start one process with its output in HOME/logs/NAME.log."""
        log = self.log(name).open("w")
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(name),
            cwd=self.home,
            start_new_session=True,  # so stopping it also stops its children
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        """Where process `name` writes its output."""
        return self.home / "logs" / f"{name}.log"

    def write_connection(self) -> None:
        """The `flwr` connection to this SuperLink in HOME/config.toml."""
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
        lines.append(f'address = "{self.address}"')
        if self.tls is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.tls / "ca.crt"}"')
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def kill(self, name: str, crash: bool = False) -> None:
        """Stop process `name` (and its children) by PID: SIGTERM, then SIGKILL (at once
        with `crash`, as a power cut would)."""
        import psutil

        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        try:  # Flower starts helpers in sessions of their own: stop those by PID too
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        try:
            os.killpg(proc.pid, signal.SIGKILL if crash else signal.SIGTERM)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        for child in family:
            try:
                child.kill() if crash else child.terminate()
            except psutil.NoSuchProcess:
                continue
        for child in psutil.wait_procs(family, timeout=10)[1]:
            child.kill()

    def stop(self, crash: bool = False) -> None:
        """Stop every process this federation started: SuperNodes first, or with `crash`
        the SuperLink first and everything at once."""
        for name in sorted(self.procs, key=lambda n: (n == "superlink") != crash):
            self.kill(name, crash)
        if self.worker_dir is not None and self.worker_dir.parent != self.home:
            shutil.rmtree(self.worker_dir, ignore_errors=True)  # the short folder in /tmp
        self.worker_dir = None

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launch(
    run_dir: Path,
    home: Path,
    connection: str = CONNECTION,
    resume: bool = False,
    round_timeout: float = 600.0,
    wait_nodes: float = 120.0,
) -> None:
    """`flwr run` edgetune's app on `connection` for `run_dir` (config.yaml written) and
    wait for the run to end.

    Raises:
        EdgetuneError: the run did not finish (no summary.json): the ServerApp's own error
            first if it left one, and the logs to read.
    """
    run_config = (
        f'run-dir="{Path(run_dir).resolve()}" resume={str(resume).lower()} '
        f"round-timeout={float(round_timeout)} wait-nodes={float(wait_nodes)}"
    )
    summary, error = Path(run_dir) / "summary.json", Path(run_dir) / SERVER_ERROR
    summary.unlink(missing_ok=True)
    error.unlink(missing_ok=True)
    argv = ["flwr", "run", str(APP_DIR), *([connection] if connection else [])]
    argv += ["--run-config", run_config, "--stream"]
    done = subprocess.run(argv, env=flower_env(Path(home).resolve()), check=False)
    if error.exists():
        raise EdgetuneError(
            f"the Flower ServerApp stopped: {error.read_text().strip()}\n(flwr run exited "
            f"with {done.returncode}; its output is above, and the SuperLink's log is in "
            f"{Path(home) / 'logs'})"
        )
    if done.returncode != 0 or not summary.exists():
        raise EdgetuneError(
            f"the Flower run did not finish (flwr run exited with {done.returncode}); its "
            f"output is above, and the SuperLink's log is in {Path(home) / 'logs'}. Completed "
            f"rounds are kept: continue with `edgetune flower run --resume {run_dir}`"
        )
