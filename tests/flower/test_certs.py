"""Secrets on disk and the secure defaults of a local federation (no process started).

Private keys must never exist with wider permissions than 0600, not even between a write
and a chmod, and the folders holding them are 0700: checked under umask 0 (where a plain
write would create a world-writable file) with chmod made to fail.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edgetune.cli import main
from edgetune.errors import EdgetuneError
from edgetune.flower.certs import TLS_FILES, write_supernode_keys, write_test_certificates
from edgetune.flower.local import LocalFederation

pytest.importorskip("cryptography")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def no_chmod_and_umask_0(monkeypatch):
    """umask 0 (so the mode given at creation is the mode the file gets), and chmod fails."""

    def refuse(*_, **__):
        raise AssertionError("secrets must be created private, not chmod-ed afterwards")

    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(Path, "chmod", refuse)
    old = os.umask(0)
    yield
    os.umask(old)


def test_certificates_and_keys_are_created_private(tmp_path, no_chmod_and_umask_0):
    # Execute
    certs = write_test_certificates(tmp_path / "certs")
    keys = write_supernode_keys(tmp_path / "certs" / "keys", 2)
    # Assert: keys 0600 and their folders 0700 right after creation; public halves readable
    assert mode(certs) == 0o700 and mode(tmp_path / "certs" / "keys") == 0o700
    assert [mode(certs / f) for f in ("ca.key", "server.key")] == [0o600, 0o600]
    assert [mode(k) for k in keys] == [0o600, 0o600]
    assert all(mode(certs / f) & 0o444 == 0o444 for f in ("ca.crt", "server.pem"))
    assert all(mode(Path(f"{k}.pub")) & 0o444 == 0o444 for k in keys)
    assert not list(certs.glob(".*.tmp"))


def test_a_rewritten_key_does_not_keep_a_wider_mode(tmp_path):
    # Prepare: a world-readable file where the key goes
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "node-0").write_text("old")
    (keys / "node-0").chmod(0o644)
    # Execute
    write_supernode_keys(keys, 1)
    # Assert
    assert mode(keys / "node-0") == 0o600 and "OPENSSH PRIVATE KEY" in (keys / "node-0").read_text()


def test_a_local_federation_is_secure_by_default(tmp_path, no_chmod_and_umask_0):
    # Execute: no tls / auth given
    fed = LocalFederation(tmp_path / "home", clients=2, threads=2)
    # Assert: TLS certificates and one key pair per node, generated in HOME/certs
    certs = tmp_path / "home" / "certs"
    assert (fed.tls, fed.auth, fed.insecure) == (certs, certs / "keys", False)
    assert all((certs / f).is_file() for f in TLS_FILES)
    assert [mode(certs / "keys" / f"node-{i}") for i in range(2)] == [0o600, 0o600]
    assert mode(tmp_path / "home") == 0o700 and mode(certs) == 0o700
    assert "--ssl-keyfile" in fed.security("superlink") and "--insecure" not in fed.security(
        "superlink"
    )
    assert fed.security("supernode") == ["--root-certificates", str(certs / "ca.crt")]
    # ... and the threads: the SuperLink gets the budget, each SuperNode its share
    assert fed.env("superlink")["OMP_NUM_THREADS"] == "2"
    assert [fed.env("supernode-1")[v] for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")] == ["1"] * 2


def test_a_second_start_reuses_the_federations_certificates(tmp_path):
    first = LocalFederation(tmp_path / "home", clients=1, threads=1)
    ca = (first.tls / "ca.crt").read_bytes()
    key = (first.auth / "node-0").read_bytes()
    second = LocalFederation(tmp_path / "home", clients=2, threads=1)
    assert (second.tls / "ca.crt").read_bytes() == ca
    assert (second.auth / "node-1").is_file()  # more nodes: a new set of keys
    assert (second.auth / "node-0").read_bytes() != key


def test_insecure_is_explicit_and_exclusive(tmp_path):
    fed = LocalFederation(tmp_path / "home", clients=1, insecure=True, threads=1)
    assert fed.tls is None and fed.security("supernode") == ["--insecure"]
    assert not (tmp_path / "home" / "certs").exists()
    certs = write_test_certificates(tmp_path / "certs")
    with pytest.raises(EdgetuneError, match="--insecure turns TLS .* but --tls was given"):
        LocalFederation(tmp_path / "home2", clients=1, insecure=True, tls=certs, threads=1)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["flower", "up", "--clients", "1", "--insecure", "--auth", "KEYS", "--home", "HOME"],
            "--insecure turns TLS and SuperNode authentication off, but --auth was given",
        ),
        (
            ["flower", "run", "--tls", "CERTS", "--home", "HOME", "--out", "RUN"],
            "--tls only apply to a federation started for the run: add --local N",
        ),
        (
            ["flower", "run", "--insecure", "--devices", "rpi5", "--out", "RUN"],
            "--devices, --insecure only apply to a federation started for the run",
        ),
    ],
)
def test_conflicting_security_flags_are_refused(tmp_path, capsys, args, message):
    status = main([str(tmp_path / a) if a.isupper() else a for a in args])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "HOME").exists() and not (tmp_path / "RUN").exists()


@pytest.mark.parametrize("where", ["f.txt", "f.txt/certs"], ids=["is-a-file", "under-a-file"])
def test_a_certificate_folder_that_is_a_file_is_refused(tmp_path, where):
    # Prepare
    (tmp_path / "f.txt").write_text("x")
    # Execute / Assert
    with pytest.raises(
        EdgetuneError, match=r"cannot create folder .*f\.txt.*not a file and not inside one"
    ):
        write_test_certificates(tmp_path / where)
    assert (tmp_path / "f.txt").read_text() == "x"
