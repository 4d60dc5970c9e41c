"""Test certificates for TLS between `flwr`, the SuperLink and SuperNodes, and SuperNode
authentication keys.

`write_test_certificates(DIR)` writes a self-signed CA (ca.crt, ca.key) and a server
certificate for 127.0.0.1 / localhost signed by it (server.pem, server.key). The SuperLink
serves server.pem; SuperNodes and `flwr` trust ca.crt (`--root-certificates`). For a real
fleet, issue the server certificate for the SuperLink's public name from your own CA
(docs/deploy.md); these files are for trials and tests only.

`edgetune flower up` and `flower run --local` call `ensure_test_certificates` and
`ensure_supernode_keys` on the federation's folder, so a local federation is encrypted
and admits only its own SuperNodes unless asked otherwise (`--insecure`).

Secrets never exist with wider permissions, not even for a moment: private keys are
created 0600 (`os.open` with that mode, into a fresh file, then renamed into place) and
the folders that hold them 0700, instead of written and `chmod`ed afterwards.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from edgetune.errors import EdgetuneError

TLS_FILES = ("ca.crt", "server.pem", "server.key")  # what the SuperLink and flwr need
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: Path) -> Path:
    """Create folder `path` (and its parents) readable by its owner only, if missing.

    Raises:
        EdgetuneError: `path`, or a folder above it, is a file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise EdgetuneError(
            f"cannot create folder {path}: {exc.filename}: {exc.strerror}; pass a folder "
            "(or a new path) that is not a file and not inside one"
        ) from exc
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` as a file created with mode 0600 (never wider, whatever the
    umask): into a fresh temporary file, then renamed over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_test_certificates(out: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Path:
    """Write ca.crt, ca.key, server.pem and server.key into `out`; returns `out`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = private_dir(out)
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("edgetune test CA"))
        .issuer_name(name("edgetune test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    server = (
        x509.CertificateBuilder()
        .subject_name(name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    private = serialization.PrivateFormat.TraditionalOpenSSL
    plain = serialization.NoEncryption()
    (out / "ca.crt").write_bytes(ca.public_bytes(pem))
    write_private(out / "ca.key", ca_key.private_bytes(pem, private, plain))
    (out / "server.pem").write_bytes(server.public_bytes(pem))
    write_private(out / "server.key", key.private_bytes(pem, private, plain))
    return out


def ensure_test_certificates(out: Path) -> Path:
    """The test certificates in `out`: those already there when complete, else new ones."""
    if all((Path(out) / name).is_file() for name in TLS_FILES):
        return Path(out)
    return write_test_certificates(out)


def write_supernode_keys(out: Path, count: int) -> list[Path]:
    """Write SuperNode authentication key pairs node-I (OpenSSH private key, P-384) and
    node-I.pub for I in 0..count-1 into `out`; returns the private key paths. Register
    each .pub with `flwr supernode register` and start the SuperNode with
    `--auth-supernode-private-key node-I`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = private_dir(out)
    paths = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP384R1())
        private = out / f"node-{i}"
        write_private(
            private,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
        )
        (out / f"node-{i}.pub").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
        )
        paths.append(private)
    return paths


def ensure_supernode_keys(out: Path, count: int) -> Path:
    """SuperNode key pairs node-0 .. node-(count-1) in `out`: those already there when
    every pair is complete, else a new set; returns `out`."""
    out = Path(out)
    pairs = [(out / f"node-{i}", out / f"node-{i}.pub") for i in range(count)]
    if not all(a.is_file() and b.is_file() for a, b in pairs):
        write_supernode_keys(out, count)
    return out
