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
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IProtocolNegotiationFactory,
)
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["ALPNSafeContextFactory", "TLSPolicy", "alpn_safe", "context_from_pem"]

_log = Logger()

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


def _negotiable_protocols(tls_protocol: Any, configured: tuple[bytes, ...]) -> list:
    """What the application behind C{tls_protocol} speaks over ALPN, if anything."""
    protocols = list(configured)
    wrapped_factory = getattr(
        getattr(tls_protocol, "factory", None), "wrappedFactory", None
    )
    negotiation = IProtocolNegotiationFactory(wrapped_factory, None)
    if negotiation is not None:
        protocols = list(negotiation.acceptableProtocols()) + protocols
    return protocols


def refuse_unknown_alpn(
    context: SSL.Context, configured: tuple[bytes, ...] = ()
) -> None:
    """Answer an ALPN offer we share nothing with by ignoring it.

    Twisted 26.10's certificate options answer with an empty protocol, which
    OpenSSL turns into a fatal C{internal_error} alert: every client that
    offers ALPN (browsers' TLS stacks, Go's C{NextProtos}, C{openssl s_client
    -alpn}) fails the handshake.  RFC 7301 lets a server go on without ALPN,
    which is what SMTP needs.  Protocols configured on the context
    (C{acceptableProtocols}) or by the factory are still chosen.
    """
    if getattr(context, "_smtpd_alpn_fixed", False):
        return
    context._smtpd_alpn_fixed = True  # type: ignore[attr-defined]

    def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
        for protocol in _negotiable_protocols(connection.get_app_data(), configured):
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    try:
        context.set_alpn_select_callback(select)
    except ValueError:
        # pyOpenSSL freezes a context once it made a connection elsewhere.
        _log.warn(
            "smtpd: a TLS context was used before twisted_smtpd saw it;"
            " clients offering ALPN may fail its handshake"
        )


@implementer(IOpenSSLServerConnectionCreator)
class ALPNSafeContextFactory:
    """A server context factory whose contexts survive a client offering ALPN.

    Wraps an C{IOpenSSLServerConnectionCreator} (such as
    C{CertificateOptions}) or an old-style context factory; attributes not
    defined here are the wrapped object's.  A context another callback
    switches to during the handshake (C{contextForServerName}) is not seen
    here and keeps whatever ALPN behaviour it has.
    """

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped
        self._configured = tuple(getattr(wrapped, "_acceptableProtocols", None) or ())

    def serverConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        # The context must be fixed before its first connection (pyOpenSSL
        # forbids changes after); CertificateOptions caches the one it uses.
        if not hasattr(self.wrapped, "getContext"):
            return self.wrapped.serverConnectionForTLS(tls_protocol)
        context = self.getContext()
        if IOpenSSLServerConnectionCreator.providedBy(self.wrapped):
            return self.wrapped.serverConnectionForTLS(tls_protocol)
        return SSL.Connection(context, None)

    def getContext(self) -> SSL.Context:
        context = self.wrapped.getContext()
        refuse_unknown_alpn(context, self._configured)
        return context

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    def __repr__(self) -> str:
        return f"ALPNSafeContextFactory({self.wrapped!r})"


def alpn_safe(context_factory: Any) -> Any:
    """C{context_factory}, made safe for ALPN clients (see L{refuse_unknown_alpn})."""
    if context_factory is None or isinstance(context_factory, ALPNSafeContextFactory):
        return context_factory
    return ALPNSafeContextFactory(context_factory)


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

    def __post_init__(self) -> None:
        # Every context we hand to startTLS must survive an ALPN offer.
        object.__setattr__(self, "context_factory", alpn_safe(self.context_factory))

    @classmethod
    def from_files(
        cls, cert_path: str, key_path: str, required: bool = False
    ) -> TLSPolicy:
        return cls(context_from_pem(cert_path, key_path), required)


def _ssl_endpoint_inside(endpoint: Any) -> Any:
    """The C{SSL4ServerEndpoint} an endpoint is or wraps (C{haproxy:ssl:...})."""
    from twisted.internet.endpoints import SSL4ServerEndpoint

    while endpoint is not None and not isinstance(endpoint, SSL4ServerEndpoint):
        endpoint = getattr(endpoint, "_wrappedEndpoint", None)
    return endpoint


def fix_ssl_endpoint(endpoint: Any) -> Any:
    """Make an C{ssl:} endpoint's context ALPN-safe; other endpoints pass as-is.

    Returns the endpoint, changed in place.
    """
    inner = _ssl_endpoint_inside(endpoint)
    if inner is not None:
        inner._sslContextFactory = alpn_safe(inner._sslContextFactory)
    return endpoint
