# -*- test-case-name: tests.test_tls -*-
"""
TLS policy: the context for STARTTLS and whether TLS is required.

Implicit TLS needs nothing here: listen on an C{ssl:} endpoint and sessions
are secure from the first byte (and never offer STARTTLS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import ssl

__all__ = ["TLSPolicy", "context_from_pem"]

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise OSError(
            error.errno, f"cannot read TLS {what} {path!r}: {error.strerror}"
        ) from None


def context_from_pem(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """A server context from a PEM certificate (with any chain) and key.

    Raises:
        OSError: a file cannot be read.
        ValueError: the files hold no usable certificate or key, or they do
            not belong together.
    """
    cert_data = _read(cert_path, "certificate")
    key_data = _read(key_path, "key")
    blocks = _PEM_CERT.findall(cert_data)
    if not blocks:
        raise ValueError(f"no PEM certificate in {cert_path!r}")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except Exception:
        raise ValueError(f"no usable PEM private key in {key_path!r}") from None
    try:
        certificates = [x509.load_pem_x509_certificate(block) for block in blocks]
    except Exception as error:
        raise ValueError(f"bad PEM certificate in {cert_path!r}: {error}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if certificates[0].public_key().public_bytes(encoding, public) != (
        key.public_key().public_bytes(encoding, public)
    ):
        raise ValueError(
            f"TLS certificate {cert_path!r} and key {key_path!r} do not fit together"
        )
    # cryptography objects, not pyOpenSSL ones: pyOpenSSL deprecates the latter.
    return ssl.CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=certificates[0],  # type: ignore[arg-type]
        extraCertChain=certificates[1:],  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class TLSPolicy:
    """STARTTLS for plain listeners.

    Args:
        context_factory: an C{IOpenSSLServerConnectionCreator} or old-style
            context factory, as C{transport.startTLS} takes.
        required: refuse everything but NOOP, EHLO, HELO, STARTTLS, RSET and
            QUIT before TLS (530 5.7.0).
    """

    context_factory: Any
    required: bool = False

    @classmethod
    def from_files(
        cls, cert_path: str, key_path: str, required: bool = False
    ) -> TLSPolicy:
        return cls(context_from_pem(cert_path, key_path), required)
