"""Test certificates for TLS between `flwr`, the SuperLink and SuperNodes, and SuperNode
authentication keys.

`write_test_certificates(DIR)` writes a self-signed CA (ca.crt, ca.key) and a server
certificate for 127.0.0.1 / localhost signed by it (server.pem, server.key). The SuperLink
serves server.pem; SuperNodes and `flwr` trust ca.crt (`--root-certificates`). For a real
fleet, issue the server certificate for the SuperLink's public name from your own CA
(docs/deploy.md); these files are for trials and tests only.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


def write_test_certificates(out: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Path:
    """Write ca.crt, ca.key, server.pem and server.key into `out`; returns `out`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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
    (out / "ca.key").write_bytes(ca_key.private_bytes(pem, private, plain))
    (out / "server.pem").write_bytes(server.public_bytes(pem))
    (out / "server.key").write_bytes(key.private_bytes(pem, private, plain))
    for secret in ("ca.key", "server.key"):
        (out / secret).chmod(0o600)
    return out


def write_supernode_keys(out: Path, count: int) -> list[Path]:
    """Write SuperNode authentication key pairs node-I (OpenSSH private key, P-384) and
    node-I.pub for I in 0..count-1 into `out`; returns the private key paths. Register
    each .pub with `flwr supernode register` and start the SuperNode with
    `--auth-supernode-private-key node-I`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP384R1())
        private = out / f"node-{i}"
        private.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
        )
        private.chmod(0o600)
        (out / f"node-{i}.pub").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
        )
        paths.append(private)
    return paths
