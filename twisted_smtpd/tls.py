# -*- test-case-name: tests.test_tls -*-
"""
TLS: the policy (the context for STARTTLS, whether TLS is required) and the
server context twisted_smtpd builds from PEM files.

L{ServerTLSContext} serves one or more certificates, chosen by the name the
client asks for (SNI, the first is the default), reloads them from disk
without dropping sessions, reads passphrase-protected keys, and applies the
Mozilla "intermediate" profile: TLS 1.2 and 1.3, AEAD ciphers with forward
secrecy only (no CBC, no static RSA), session resumption by tickets.

Implicit TLS needs no policy: listen on an C{ssl:} endpoint and sessions are
secure from the first byte (and never offer STARTTLS).  Whatever context is
used, a client offering ALPN is answered with "no protocol", not the fatal
alert Twisted 26.10's C{CertificateOptions} send (L{refuse_unknown_alpn}).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IProtocolNegotiationFactory,
)
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import implementer

__all__ = [
    "ALPNSafeContextFactory",
    "INTERMEDIATE_CIPHERS",
    "ServerTLSContext",
    "TLSPolicy",
    "alpn_safe",
    "context_from_pem",
    "fix_ssl_endpoint",
    "read_passphrase_file",
    "refuse_unknown_alpn",
]

_log = Logger()

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)

#: TLS 1.2 suites of Mozilla's "intermediate" profile (v5.7): ECDHE or DHE
#: (ffdhe2048) key exchange, AES-GCM or ChaCha20-Poly1305.  No CBC (LUCKY13),
#: no static RSA key exchange (no forward secrecy, ROBOT).  TLS 1.3 suites are
#: OpenSSL's defaults, which are the profile's.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)

# RFC 7919 ffdhe2048, the group the profile names for DHE (from `openssl
# genpkey -genparam -algorithm DH -pkeyopt dh_param:ffdhe2048`).
_FFDHE2048 = b"""\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

# SSL_OP_PRIORITIZE_CHACHA (OpenSSL 1.1.1+, not exported by pyOpenSSL): with
# server order, a client that prefers ChaCha20 (no AES hardware) still gets it.
_OP_PRIORITIZE_CHACHA = 0x00200000

Passphrase = Union[str, bytes, None]


# -- reading PEM files ---------------------------------------------------------
def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise OSError(
            error.errno, f"cannot read TLS {what} {path!r}: {error.strerror}"
        ) from None


def read_passphrase_file(path: str) -> bytes:
    """The passphrase in C{path}: its first line, without the line ending.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is empty.
    """
    data = _read(path, "key passphrase file")
    passphrase = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not passphrase:
        raise ValueError(f"TLS key passphrase file {path!r} is empty")
    return passphrase


def _as_bytes(passphrase: Passphrase) -> Optional[bytes]:
    if isinstance(passphrase, str):
        return passphrase.encode("utf-8")
    return passphrase or None


def _load_key(key_data: bytes, key_path: str, passphrase: Optional[bytes]) -> Any:
    """The private key in C{key_data}: plain, encrypted PKCS#8, or legacy PEM
    encryption (C{Proc-Type: 4,ENCRYPTED} with C{DEK-Info})."""
    try:
        return serialization.load_pem_private_key(key_data, password=passphrase)
    except TypeError:
        if passphrase is None:
            raise ValueError(
                f"TLS key {key_path!r} is encrypted and no passphrase was given"
                " (--tls-key-passphrase-file)"
            ) from None
        # A passphrase for other keys; this one is not encrypted.
        return _load_key(key_data, key_path, None)
    except ValueError as error:
        # A wrong passphrase usually fails the decryption, but about one time
        # in 300 it decrypts to valid padding and the DER parse fails instead.
        if passphrase is not None and (
            "password" in str(error).lower() or b"ENCRYPTED" in key_data
        ):
            raise ValueError(f"wrong passphrase for TLS key {key_path!r}") from None
        raise ValueError(f"no usable PEM private key in {key_path!r}") from None
    except Exception:
        raise ValueError(f"no usable PEM private key in {key_path!r}") from None


def _load_pair(
    cert_path: str,
    key_path: str,
    passphrase: Optional[bytes] = None,
    chain_path: Optional[str] = None,
) -> tuple[list[x509.Certificate], Any]:
    """The certificates (leaf first, then its chain) and the key they fit.

    Raises:
        OSError: a file cannot be read.
        ValueError: the files hold no usable certificate or key, the
            passphrase is wrong or missing, or certificate and key do not
            belong together.
    """
    cert_data = _read(cert_path, "certificate")
    key_data = _read(key_path, "key")
    if chain_path is not None:
        cert_data += b"\n" + _read(chain_path, "certificate chain")
    blocks = _PEM_CERT.findall(cert_data)
    if not blocks:
        raise ValueError(f"no PEM certificate in {cert_path!r}")
    key = _load_key(key_data, key_path, passphrase)
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
    return certificates, key


def context_from_pem(
    cert_path: str, key_path: str, passphrase: Passphrase = None
) -> ssl.CertificateOptions:
    """Twisted C{CertificateOptions} from a PEM certificate (with any chain)
    and key, with the intermediate profile's ciphers and TLS 1.2+.

    A base for contexts with more options (client certificates); for plain
    serving L{ServerTLSContext} adds SNI and reloading.

    Raises:
        OSError: a file cannot be read.
        ValueError: as L{ServerTLSContext}.
    """
    certificates, key = _load_pair(cert_path, key_path, _as_bytes(passphrase))
    # cryptography objects, not pyOpenSSL ones: pyOpenSSL deprecates the latter.
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=certificates[0],  # type: ignore[arg-type]
        extraCertChain=certificates[1:],  # type: ignore[arg-type]
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(
            INTERMEDIATE_CIPHERS
        ),
        enableSessionTickets=True,
    )


# -- ALPN ----------------------------------------------------------------------
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
        if name == "wrapped":  # not set yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def __repr__(self) -> str:
        return f"ALPNSafeContextFactory({self.wrapped!r})"


def alpn_safe(context_factory: Any) -> Any:
    """C{context_factory}, made safe for ALPN clients (see L{refuse_unknown_alpn})."""
    if context_factory is None or isinstance(
        context_factory, (ALPNSafeContextFactory, ServerTLSContext)
    ):
        return context_factory
    return ALPNSafeContextFactory(context_factory)


# -- our own server context: SNI, reload, passphrases ------------------------------
def _dns_names(certificate: x509.Certificate) -> list[str]:
    """The names a certificate is for: its DNS SANs, else its common name."""
    try:
        san = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [
            str(attribute.value)
            for attribute in certificate.subject.get_attributes_for_oid(
                NameOID.COMMON_NAME
            )
        ]
    return [name.lower().rstrip(".") for name in names]


def _load_dh_parameters(context: SSL.Context) -> None:
    # pyOpenSSL reads DH parameters from a file only.
    with tempfile.NamedTemporaryFile(suffix=".pem") as file:
        file.write(_FFDHE2048)
        file.flush()
        context.load_tmp_dh(file.name)


def _new_context(certificates: list[x509.Certificate], key: Any) -> SSL.Context:
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | _OP_PRIORITIZE_CHACHA
        | SSL.OP_SINGLE_ECDH_USE
    )
    context.set_cipher_list(INTERMEDIATE_CIPHERS.encode("ascii"))
    _load_dh_parameters(context)
    context.use_certificate(certificates[0])
    for extra in certificates[1:]:
        context.add_extra_chain_cert(extra)
    context.use_privatekey(key)
    context.check_privatekey()
    # Resumption: the server-side cache and tickets (OpenSSL's default, keys
    # made per context).  A session ID context is needed for either to work.
    context.set_session_id(b"twisted_smtpd")
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    refuse_unknown_alpn(context)
    return context


@dataclass(frozen=True)
class _Identity:
    """One certificate with its key, as loaded, and the context serving it."""

    cert_path: str
    key_path: str
    names: tuple[str, ...]
    context: SSL.Context


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLSContext:
    """Server TLS from PEM files: certificates chosen by SNI, reloadable.

    Args:
        pairs: C{(certificate_path, key_path)} pairs; the certificate file
            holds the leaf first, then any chain.  The first pair is served
            to clients that send no name, or one no certificate is for.
        passphrase: for encrypted keys (PKCS#8 or legacy PEM encryption);
            keys that are not encrypted ignore it.
        chain_path: an extra PEM file with the chain of the first pair
            (what C{ssl:...:extraCertChain=} gives).

    Raises:
        OSError: a file cannot be read.
        ValueError: a file holds no usable certificate or key, the passphrase
            is wrong or missing, or a certificate and its key do not fit.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        passphrase: Passphrase = None,
        chain_path: Optional[str] = None,
    ) -> None:
        if not pairs:
            raise ValueError("ServerTLSContext needs at least one certificate")
        self.pairs = [(str(cert), str(key)) for cert, key in pairs]
        self._passphrase = _as_bytes(passphrase)
        self._chain_path = chain_path
        self._identities = [self._load(index) for index in range(len(self.pairs))]
        self._index_names()

    # -- loading
    def _load(self, index: int) -> _Identity:
        cert_path, key_path = self.pairs[index]
        chain = self._chain_path if index == 0 else None
        certificates, key = _load_pair(cert_path, key_path, self._passphrase, chain)
        context = _new_context(certificates, key)
        context.set_tlsext_servername_callback(self._choose_by_name)
        return _Identity(
            cert_path, key_path, tuple(_dns_names(certificates[0])), context
        )

    def _index_names(self) -> None:
        exact: dict[str, SSL.Context] = {}
        wildcard: dict[str, SSL.Context] = {}
        for identity in self._identities:
            for name in identity.names:
                if name.startswith("*."):
                    wildcard.setdefault(name[2:], identity.context)
                else:
                    exact.setdefault(name, identity.context)
        self._exact, self._wildcard = exact, wildcard

    def _load_all(self) -> tuple[list[_Identity], list[str]]:
        """Fresh identities; for a pair that fails, the old one and a line."""
        identities, problems = [], []
        for index, old in enumerate(self._identities):
            try:
                identities.append(self._load(index))
            except (OSError, ValueError) as error:
                identities.append(old)
                problems.append(
                    f"kept the previous certificate for {old.cert_path!r}:"
                    f" {error.strerror if isinstance(error, OSError) else error}"
                )
        return identities, problems

    def reload(self) -> Deferred[list[str]]:
        """Read every certificate and key again, off the reactor thread.

        New handshakes use the new files; sessions already set up keep theirs.
        A pair that cannot be loaded keeps its previous certificate.  Fires
        with one line per pair that kept its previous certificate.
        """

        def swap(result: tuple[list[_Identity], list[str]]) -> list[str]:
            self._identities, problems = result
            self._index_names()
            return problems

        return deferToThread(self._load_all).addCallback(swap)

    def reload_now(self) -> list[str]:
        """L{reload} on this thread, for callers not running a reactor."""
        self._identities, problems = self._load_all()
        self._index_names()
        return problems

    # -- serving
    @property
    def names(self) -> list[tuple[str, ...]]:
        """The DNS names of each certificate, in the order given."""
        return [identity.names for identity in self._identities]

    def context_for(self, server_name: Optional[str]) -> SSL.Context:
        """The context serving C{server_name} (SNI), else the default one."""
        if server_name:
            name = server_name.lower().rstrip(".")
            context = self._exact.get(name)
            if context is None and "." in name:
                context = self._wildcard.get(name.split(".", 1)[1])
            if context is not None:
                return context
        return self._identities[0].context

    def _choose_by_name(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        name = raw.decode("ascii", "replace") if raw else None
        context = self.context_for(name)
        if context is not connection.get_context():
            connection.set_context(context)

    def serverConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        return SSL.Connection(self._identities[0].context, None)

    def __repr__(self) -> str:
        return f"ServerTLSContext({self.pairs!r})"


@dataclass(frozen=True)
class TLSPolicy:
    """STARTTLS for plain listeners.

    Args:
        context_factory: an C{IOpenSSLServerConnectionCreator} or old-style
            context factory, as C{transport.startTLS} takes; anything but a
            L{ServerTLSContext} is kept wrapped in an
            L{ALPNSafeContextFactory}.
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
        cls,
        cert_path: str,
        key_path: str,
        required: bool = False,
        passphrase: Passphrase = None,
    ) -> TLSPolicy:
        """A policy serving one certificate (with its chain) and key.

        Raises:
            OSError, ValueError: as L{ServerTLSContext}.
        """
        return cls.from_pairs([(cert_path, key_path)], required, passphrase)

    @classmethod
    def from_pairs(
        cls,
        pairs: Sequence[tuple[str, str]],
        required: bool = False,
        passphrase: Passphrase = None,
    ) -> TLSPolicy:
        """A policy serving several certificates, chosen by SNI (first: default).

        Raises:
            OSError, ValueError: as L{ServerTLSContext}.
        """
        return cls(ServerTLSContext(pairs, passphrase), required)

    def reload(self) -> Deferred[list[str]]:
        """Reload the certificates from disk (see L{ServerTLSContext.reload})."""
        if isinstance(self.context_factory, ServerTLSContext):
            return self.context_factory.reload()
        from twisted.internet.defer import succeed

        return succeed([])


# -- ssl: endpoints ------------------------------------------------------------
def _ssl_endpoint_inside(endpoint: Any) -> Any:
    """The C{SSL4ServerEndpoint} an endpoint is or wraps (C{haproxy:ssl:...})."""
    from twisted.internet.endpoints import SSL4ServerEndpoint

    while endpoint is not None and not isinstance(endpoint, SSL4ServerEndpoint):
        endpoint = getattr(endpoint, "_wrappedEndpoint", None)
    return endpoint


def fix_ssl_endpoint(endpoint: Any) -> Any:
    """Make an C{ssl:} endpoint's context ALPN-safe; other endpoints pass as-is.

    C{twistd smtpd} does this for every C{--port}; call it on an endpoint
    from C{serverFromString(reactor, "ssl:...")} of your own.  Returns the
    endpoint, changed in place.
    """
    inner = _ssl_endpoint_inside(endpoint)
    if inner is not None:
        inner._sslContextFactory = alpn_safe(inner._sslContextFactory)
    return endpoint
