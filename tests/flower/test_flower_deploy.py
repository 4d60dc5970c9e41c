"""edgetune on real Flower processes (SuperLink + SuperNodes on 127.0.0.1).

Parity with the in-process simulator (same config and seed: same global adapter, same
payload bytes), a SuperNode killed mid-run, the secure default (TLS and SuperNode
authentication with generated certificates and keys) refusing a node with the wrong CA or
an unregistered key, and `edgetune flower up` starting securely by default. Tests that are
not about security opt out explicitly (`insecure=True`, `--insecure`) to stay fast.
Every process started here is stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import signal
import stat
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from edgetune.cli import main
from edgetune.config import resolve_config, to_dict
from edgetune.errors import EdgetuneError
from edgetune.fed.algorithms import ALGORITHMS
from edgetune.flower.certs import write_supernode_keys, write_test_certificates
from edgetune.flower.local import CONNECTION, LocalFederation, launch
from edgetune.recipes import federate
from edgetune.runs import RunDir

pytestmark = pytest.mark.integration

FLEET = "fleet:\n  - {name: board, memory_mb: 48000, gflops: 100, up_mbps: 10, down_mbps: 10}\n"
# node 0 only fits inference (P-RGE at rank 2), node 1 backprops at the global rank
HYBRID = (
    "fleet:\n"
    "  - {name: tiny-board, memory_mb: 5, gflops: 5, up_mbps: 1, down_mbps: 5, lora_rank: 2}\n"
    "  - {name: board, memory_mb: 48000, gflops: 100, up_mbps: 10, down_mbps: 10}\n"
)


@pytest.fixture
def make_config(stories260k_path, shared_data, tmp_path):
    """A small stories260K federation of 2 always-available boards (or the `fleet` text)."""
    del shared_data

    def make(out, algorithm="fedit", method="fo", rounds=2, fleet_text=FLEET, **extra):
        fleet = tmp_path / "fleet.yaml"
        fleet.write_text(fleet_text)
        flags = {
            "model": str(stories260k_path),
            "out": str(out),
            "data.dataset": "sst2",
            "fed.algorithm": algorithm,
            "fed.method": method,
            "fed.clients": 2,
            "fed.participation": 1.0,
            "fed.rounds": rounds,
            "fed.local_steps": 3,
            "fed.fleet": str(fleet),
            "train.batch_size": 4,
            **extra,
        }
        overrides = ["data.train_size=100", "data.eval_size=16", "data.max_length=32"]
        return resolve_config(federate.FederateConfig, None, overrides, flags)

    return make


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = LocalFederation(tmp_path_factory.mktemp("flwr-home"), clients=2, insecure=True)
    with fed:
        yield fed


@contextlib.contextmanager
def same_threads_as_the_nodes(fed):
    """Compute as the SuperNodes do (their thread count), so float sums match bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(fed.node_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def flower_run(cfg, fed, **options):
    """Write the run directory and run it on `fed`."""
    run = RunDir(cfg.out, overwrite=True)
    run.write_config(to_dict(cfg))
    launch(
        run.path, fed.home, CONNECTION, **{"round_timeout": 300.0, "wait_nodes": 60.0, **options}
    )
    return run


# Every registered algorithm, with the settings its parity case exercises.
PARITY = {
    "fedit": ("fo", {}),
    "fedkseed": ("zo", {}),
    "fedkseed-pro": ("zo", {"fed.pool_size": 64}),
    # forward-gradient clients at heterogeneous LoRA ranks (rank 4 and the global 8)
    "fwdllm": ("zo", {"fed.ranks": "4,8", "zo.max_queries": 3}),
    # K large enough on stories260K's 46,240 values that a client 2 rounds behind is
    # resynced in round 3 (the first round's clients catch up in round 2)
    "fedproj": ("fo", {"fed.proj_k": 40000}),
    # random arms (the bandit's rewards would be real seconds on Flower), statistics and
    # a re-ordering every round, sparsity at the target from round 2
    "fedspine": (
        "fo",
        {"spine.policy": "random", "spine.reorder_every": 1, "spine.target_sparsity": 0.5},
    ),
}
assert set(PARITY) == set(ALGORITHMS), "every algorithm needs a Flower parity case"


@pytest.mark.parametrize(
    "algorithm, method, extra",
    [
        *[(a, m, e) for a, (m, e) in PARITY.items()],
        # a hybrid fleet: a rank-2 P-RGE seed trace (replayed by the server) beside a delta
        ("fedit", "auto", {"fleet_text": HYBRID, "peft.rank": 4, "fed.ranks": "device"}),
        # FedProj's hybrid: the P-RGE device projects its update like the backprop one
        ("fedproj", "auto", {"fleet_text": HYBRID, "fed.proj_k": 512}),
    ],
)
def test_flower_run_equals_the_simulator(
    tmp_path, make_config, federation, algorithm, method, extra
):
    # Execute: the same federation on Flower and in the simulator
    cfg = make_config(tmp_path / "flower", algorithm, method, **extra)
    flower = flower_run(cfg, federation)
    with same_threads_as_the_nodes(federation):
        federate.run(make_config(tmp_path / "sim", algorithm, method, **extra))
    sim = RunDir(tmp_path / "sim", resume=True)
    # Assert: the same global adapter
    a = load_file(flower.path / "adapter" / "adapter_model.safetensors")
    b = load_file(sim.path / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    # ... and the same bytes, round by round and client by client
    keys = ("round", "bytes_up", "bytes_down", "accepted", "eval/accuracy")
    f_rows, s_rows = flower.read_metrics(), sim.read_metrics()
    assert [{k: r.get(k) for k in keys} for r in f_rows] == [
        {k: r.get(k) for k in keys} for r in s_rows
    ]
    f_clients = flower.read_metrics("clients.jsonl")
    s_clients = sim.read_metrics("clients.jsonl")
    pick = ("round", "client", "status", "method", "rank", "bytes_up", "bytes_down")
    assert [{k: c.get(k) for k in pick} for c in f_clients] == [
        {k: c.get(k) for k in pick} for c in s_clients
    ]
    # Flower's own serialization (payload plus framing) was measured too
    assert all(c["carried_up"] > 0 and c["carried_down"] > 0 for c in f_clients)
    summary = json.loads((flower.path / "summary.json").read_text())
    assert summary["command"] == "flower run" and summary["rounds"] == 2
    if method == "auto":  # the hybrid fleet really was hybrid, and nothing was rejected
        ok = {(c["method"], c["rank"]) for c in f_clients if c["status"] == "ok"}
        assert ok == {("prge", 2 if "fed.ranks" in extra else None), ("fo", None)}
        assert all(r["rejected"] == 0 and r["accepted"] == 2 for r in f_rows[1:])


def test_differential_privacy_runs_on_flower_with_its_accounting(tmp_path, make_config, federation):
    # Execute: FedKSeed with server-side DP and a secret seed pool on Flower
    extra = {"dp.noise": 1.0, "dp.clip": 0.5, "fed.pool_size": 64, "fed.secret_pool": True}
    run = flower_run(make_config(tmp_path / "dp", "fedkseed", "zo", **extra), federation)
    # Assert: every round accounted, the noise on every pool seed travelled down
    rows = run.read_metrics()
    summary = json.loads((run.path / "summary.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["epsilon"] > rows[1]["epsilon"] > 0
    assert summary["dp"]["epsilon"] == rows[2]["epsilon"] and summary["dp"]["rounds"] == 2
    assert all(r["accepted"] == 2 for r in rows[1:])
    clients = run.read_metrics("clients.jsonl")
    assert max(c["bytes_down"] for c in clients if c["round"] == 2) > 64 * 8  # dense scalars
    # the round keys travelled with the scalars and every device took them (a device
    # whose broadcast lacks them, or holds malformed ones, fails its round)
    assert all(c["status"] == "ok" for c in clients)


def test_local_differential_privacy_runs_on_flower_and_its_rounds_reach_tensorboard(
    tmp_path, make_config, federation
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Execute: FedIT whose devices clip and noise their own deltas (dp.where=device),
    # mirrored to TensorBoard by the ServerApp
    extra = {"dp.noise": 0.5, "dp.clip": 1.0, "dp.where": "device", "report_to": "tensorboard"}
    run = flower_run(make_config(tmp_path / "ldp", "fedit", "fo", **extra), federation)
    # Assert: every noised delta passed the server's check, every round was accounted
    rows = run.read_metrics()
    assert all(r["accepted"] == 2 for r in rows[1:]) and rows[2]["epsilon"] > rows[1]["epsilon"]
    assert all(c["status"] == "ok" for c in run.read_metrics("clients.jsonl"))
    # ... and TensorBoard's own reader finds every round's accuracy and epsilon
    events = EventAccumulator(str(run.path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("eval/accuracy", "epsilon"):
        logged = {e.step: e.value for e in events.Scalars(tag)}
        want = {r["round"]: r[tag] for r in rows if tag in r}
        assert logged.keys() == want.keys() and len(want) >= 2
        assert all(logged[k] == pytest.approx(v, rel=1e-6) for k, v in want.items())


def test_a_killed_supernode_does_not_stop_the_run(tmp_path, make_config):
    cfg = make_config(tmp_path / "run", rounds=2)
    with LocalFederation(tmp_path / "home", clients=2, insecure=True) as fed:
        run = RunDir(cfg.out, overwrite=True)
        run.write_config(to_dict(cfg))
        errors = []

        def go():
            try:
                launch(run.path, fed.home, CONNECTION, round_timeout=45.0, wait_nodes=60.0)
            except Exception as exc:  # reported below
                errors.append(exc)

        thread = threading.Thread(target=go)
        thread.start()
        # Kill SuperNode 1 once the server has greeted both nodes (round 0 is logged)
        deadline = time.monotonic() + 240
        while not (run.path / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        fed.kill("supernode-1")
        thread.join(timeout=400)
    assert not thread.is_alive() and not errors
    clients = run.read_metrics("clients.jsonl")
    node1 = [c["status"] for c in clients if c["client"] == 1]
    assert node1 and all(s.startswith("no reply") for s in node1)
    assert all(c["status"] == "ok" for c in clients if c["client"] == 0)
    rows = run.read_metrics()
    assert [r["accepted"] for r in rows[1:]] == [1, 1]
    assert json.loads((run.path / "summary.json").read_text())["status"] == "done"
    from edgetune.report.federated import render

    row = next(x for x in render(run.path).read_text().splitlines() if x.startswith("| board"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert (cells[2], cells[6]) == ("2", "2")  # ok: node 0 twice; lost: node 1 twice


def test_a_dead_worker_counts_as_a_lost_client_and_the_run_finishes(tmp_path, make_config):
    # Prepare: two SuperNodes, each with its worker; node 1's worker dies before the run
    cfg = make_config(tmp_path / "run", rounds=2)
    with LocalFederation(tmp_path / "home", clients=2, insecure=True) as fed:
        fed.kill("worker-1", crash=True)
        # Execute
        run = flower_run(cfg, fed, round_timeout=120.0)
    # Assert: node 1 replied with the worker's error each round, node 0 trained, and
    # the run completed its rounds with node 0's updates alone
    clients = run.read_metrics("clients.jsonl")
    node1 = [c["status"] for c in clients if c["client"] == 1]
    assert len(node1) == 2 and all("worker" in s and s.startswith("error:") for s in node1)
    assert [c["status"] for c in clients if c["client"] == 0] == ["ok", "ok"]
    assert [r["accepted"] for r in run.read_metrics()[1:]] == [1, 1]
    assert json.loads((run.path / "summary.json").read_text())["status"] == "done"


def test_server_restarted_from_its_last_round_ends_like_an_uninterrupted_run(tmp_path, make_config):
    # FedKSeed-Pro: the seed sampling depends on every past round's scalars, which the
    # restarted server and the new devices must all recover
    cfg = make_config(tmp_path / "run", "fedkseed-pro", "zo", rounds=3)
    run = RunDir(cfg.out, overwrite=True)
    run.write_config(to_dict(cfg))
    # Execute: kill the whole federation (SuperLink, ServerApp, SuperNodes) after round 1
    failures = []

    def first_attempt(home):
        try:
            launch(run.path, home, CONNECTION)
        except EdgetuneError as exc:  # expected: the federation is killed under it
            failures.append(exc)

    with LocalFederation(tmp_path / "home1", clients=2, insecure=True) as fed:
        thread = threading.Thread(target=first_attempt, args=(fed.home,))
        thread.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(run.path.glob("state/round-*/round.json")):
            time.sleep(0.2)
        fed.stop(crash=True)
        thread.join(timeout=120)
    assert failures and "--resume" in str(failures[0])
    saved = max(run.path.glob("state/round-*/round.json"))
    interrupted = json.loads(saved.read_text())["round"]
    # ... and resume from the CLI on new processes (the devices lost their state too)
    home = str(tmp_path / "home2")
    resume = ["flower", "run", "--resume", str(run.path), "--local", "2", "--insecure"]
    assert main([*resume, "--home", home]) == 0
    assert (run.path / "report.md").exists()
    with same_threads_as_the_nodes(fed):  # the first federation: also 2 SuperNodes
        federate.run(make_config(tmp_path / "sim", "fedkseed-pro", "zo", rounds=3))
    # Assert: the same global adapter as the uninterrupted simulation, every round logged once
    a = load_file(run.path / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "sim" / "adapter" / "adapter_model.safetensors")
    assert 1 <= interrupted < 3
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert [r["round"] for r in run.read_metrics()] == [0, 1, 2, 3]
    resumes = run.read_metrics("resumes.jsonl")  # logged as finetune logs its resumes
    assert [(r["round"], r["dropped"]) for r in resumes] == [(interrupted, [])]


def test_by_default_tls_and_supernode_auth_admit_only_trusted_registered_nodes(
    tmp_path, make_config
):
    # Prepare: two intruders: one trusting another CA, one with a key the SuperLink does
    # not know; the federation itself is started with its defaults
    other = write_test_certificates(tmp_path / "other-ca")
    stranger_key = write_supernode_keys(tmp_path / "strangers", 1)[0]
    with LocalFederation(tmp_path / "home", clients=2) as fed:
        # the defaults: certificates and keys generated into HOME/certs, nodes' threads set
        assert fed.tls == tmp_path / "home" / "certs" and fed.auth == fed.tls / "keys"
        assert "--enable-supernode-auth" in fed.procs["superlink"].args
        node_env = psutil.Process(fed.procs["supernode-0"].pid).environ()
        keys = fed.auth
        # (the wrong-CA node holds a registered key: only TLS can stop it)
        wrong_ca = fed.start_node(6, root_certificates=other / "ca.crt", key=keys / "node-0")
        unregistered = fed.start_node(7, key=stranger_key)
        codes = wrong_ca.wait(timeout=120), unregistered.wait(timeout=120)
        logs = fed.log("supernode-6").read_text(), fed.log("supernode-7").read_text()
        # Execute: the federation runs with TLS and authentication on
        run = flower_run(make_config(tmp_path / "run", rounds=1), fed)
    # Assert: both intruders were refused before getting a node id; the run succeeded
    assert codes[0] != 0 and "CERTIFICATE_VERIFY_FAILED" in logs[0]
    assert codes[1] != 0 and "Failed to activate SuperNode" in logs[1]
    assert all("SuperNode ID" not in log for log in logs)
    assert json.loads((run.path / "summary.json").read_text())["status"] == "done"
    assert [r["accepted"] for r in run.read_metrics()[1:]] == [2]
    assert node_env["OMP_NUM_THREADS"] == node_env["MKL_NUM_THREADS"] == str(fed.node_threads)


def test_flower_up_starts_securely_by_default_and_stops_on_sigterm(tmp_path):
    # Execute: `edgetune flower up` as a user runs it, with no security flags
    home = tmp_path / "home"
    argv = [sys.executable, "-m", "edgetune.cli", "flower", "up", "--clients", "1"]
    up = subprocess.Popen(
        [*argv, "--home", str(home), "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        banner = []
        while not banner or ("Stop: Ctrl-C" not in banner[-1] and banner[-1]):
            banner.append(up.stdout.readline())
        family = psutil.Process(up.pid).children(recursive=True)
        cmdlines = [" ".join(p.cmdline()) for p in family]
    finally:
        up.send_signal(signal.SIGTERM)
        status = up.wait(timeout=60)
    # Assert: TLS and SuperNode authentication on, with keys made private in HOME/certs
    assert any("Security: TLS with" in line for line in banner), banner
    superlink = next(c.split() for c in cmdlines if "flower-superlink" in c)
    supernode = next(c.split() for c in cmdlines if "flower-supernode" in c)
    assert "--enable-supernode-auth" in superlink and "--insecure" not in superlink
    assert str(home / "certs" / "server.key") in superlink
    assert "--auth-supernode-private-key" in supernode and "--insecure" not in supernode
    assert stat.S_IMODE((home / "certs" / "keys" / "node-0").stat().st_mode) == 0o600
    # ... and SIGTERM stopped it cleanly, with every process it started
    assert status == 0 and psutil.wait_procs(family, timeout=30)[1] == []


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_nodes", "needs at least one SuperNode, not 0: pass --clients 1 or more"),
        ("no_certificates", "lacks ca.crt, server.pem, server.key: create it with"),
        ("too_few_keys", "lacks node-1, node-1.pub for 2 SuperNodes"),
        ("insecure_with_tls", "--insecure turns TLS and SuperNode authentication off, but"),
    ],
)
def test_flower_up_refuses_a_federation_that_cannot_come_up(tmp_path, capsys, case, message):
    certs = write_test_certificates(tmp_path / "certs")
    write_supernode_keys(tmp_path / "keys", 1)
    args = {
        "no_nodes": ["--clients", "0"],
        "no_certificates": ["--clients", "1", "--tls", str(tmp_path / "nowhere")],
        "too_few_keys": ["--clients", "2", "--tls", str(certs), "--auth", str(tmp_path / "keys")],
        "insecure_with_tls": ["--clients", "1", "--tls", str(certs), "--insecure"],
    }[case]
    status = main(["flower", "up", "--home", str(tmp_path / "home"), *args])
    err = capsys.readouterr().err
    assert status == 2 and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "home").exists()  # refused before anything was started


def test_a_federation_that_fails_to_start_stops_what_it_started(tmp_path):
    # Prepare: TLS and auth on, but node 0's public key is not a key, so registering it
    # fails after the SuperLink (and its helper processes) are up
    import psutil

    certs = write_test_certificates(tmp_path / "certs")
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "node-0").write_text("not a key")
    (keys / "node-0.pub").write_text("not a key")
    fed = LocalFederation(tmp_path / "home", clients=1, tls=certs, auth=keys)
    # Execute
    with pytest.raises(EdgetuneError, match="register .*node-0.pub failed"):
        fed.start()
    # Assert: no process started for this federation is left running
    time.sleep(1.0)
    left = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(tmp_path) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            left.append(cmdline)
    assert fed.procs == {} and left == [], left
