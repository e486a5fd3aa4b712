"""Throw-away CAs, server certificates and keys for TLS tests, made at run time."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

PEM = serialization.Encoding.PEM


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key(key_type: str):
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def key_bytes(key, passphrase: Optional[bytes] = None, legacy: bool = False) -> bytes:
    """PEM of C{key}: PKCS#8, or with C{legacy} the traditional format, which
    with a passphrase carries C{Proc-Type: 4,ENCRYPTED} and C{DEK-Info}."""
    encryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    form = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if legacy
        else serialization.PrivateFormat.PKCS8
    )
    return key.private_bytes(PEM, form, encryption)


def make_certificates(directory: Path) -> dict[str, Path]:
    """Write ca.pem (and ca-key.pem), cert.pem (leaf + CA chain) and key.pem
    for 'localhost' and 'mx.test'."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("twisted_smtpd test CA"))
        .issuer_name(_name("twisted_smtpd test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem", "ca-key": directory / "ca-key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(PEM))
    paths["ca-key"].write_bytes(key_bytes(ca_key))
    paths.update(make_leaf(directory, paths, ["localhost", "mx.test"]))
    return paths


def make_leaf(
    directory: Path,
    ca_paths: dict[str, Path],
    names: Sequence[str],
    stem: str = "",
    key_type: str = "ec",
    passphrase: Optional[bytes] = None,
    legacy_key: bool = False,
) -> dict[str, Path]:
    """A server certificate for C{names} (the first is also its CN) signed by
    the CA in C{ca_paths}: {stem}cert.pem (leaf + CA) and {stem}key.pem."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca = x509.load_pem_x509_certificate(ca_paths["ca"].read_bytes())
    ca_key = serialization.load_pem_private_key(ca_paths["ca-key"].read_bytes(), None)
    key = _key(key_type)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in names]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"cert": directory / f"{stem}cert.pem", "key": directory / f"{stem}key.pem"}
    paths["cert"].write_bytes(leaf.public_bytes(PEM) + ca.public_bytes(PEM))
    paths["key"].write_bytes(key_bytes(key, passphrase, legacy_key))
    return paths
