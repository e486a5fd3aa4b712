# -*- test-case-name: tests.test_testserver -*-
"""
A real SMTP server for tests: on 127.0.0.1, a free port, with the messages it
took, a transcript of every session, and scripted faults.

Two ways to run it:

- B{thread mode} (synchronous tests: smtplib, Django, Flask-Mail, aiosmtplib
  in its own loop): the server runs on a private reactor in a background
  thread, shared by every server of the process.  It never touches the global
  reactor, so it works beside pytest-twisted and trial.  C{wait_for} blocks.
- B{reactor mode} (pytest-twisted and trial tests): the server runs on the
  reactor the test already runs, no thread.  C{wait_for} returns a Deferred.

In thread mode::

    server = start_server()                     # thread mode
    smtplib.SMTP(server.host, server.port).sendmail(...)
    [message] = server.wait_for(1)
    server.stop()

The pytest fixtures are in L{twisted_smtpd.pytest_plugin}; trial tests use
L{SMTPServerMixin}.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import email.policy
import ipaddress
import os
import re
import shutil
import ssl
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, Callable, Optional, Union

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IHandshakeListener,
    ISSLTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from ._session import Envelope, Limits
from .auth import AuthPolicy
from .factory import SMTPFactory
from .replies import SMTPError
from .tls import TLSPolicy, alpn_safe

__all__ = [
    "PHASES",
    "ReceivedMessage",
    "SMTPServerMixin",
    "SMTPTestServer",
    "SessionTranscript",
    "ThrowawayCertificates",
    "reactor_thread",
    "start_server",
]

_log = Logger()

#: where a fault rule can act: the greeting, MAIL, RCPT, end of DATA
PHASES = ("connect", "mail", "rcpt", "data")
#: throttled bytes move every this many seconds
_TICK = 0.1
#: transcript lines kept per session (a test may send big messages)
_MAX_LINES = 2000


# -- certificates ----------------------------------------------------------------
class ThrowawayCertificates:
    """A CA and a server certificate for localhost, 127.0.0.1 and ::1.

    Made at run time with C{cryptography}; the files live in a temporary
    directory removed at exit.
    """

    __test__ = False

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        def name(common_name: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

        now = datetime.datetime.now(datetime.timezone.utc)
        valid = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            x509.CertificateBuilder()
            .subject_name(name("twisted_smtpd throw-away test CA"))
            .issuer_name(name("twisted_smtpd throw-away test CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(name("localhost"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        self._ca = ca
        self._leaf = leaf
        self._key = key
        self.ca_pem: bytes = ca.public_bytes(pem)
        self.cert_pem: bytes = leaf.public_bytes(pem)
        self.key_pem: bytes = key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        directory = tempfile.mkdtemp(prefix="twisted_smtpd-certs-")
        atexit.register(shutil.rmtree, directory, True)
        self.ca_path = os.path.join(directory, "ca.pem")
        self.cert_path = os.path.join(directory, "cert.pem")
        self.key_path = os.path.join(directory, "key.pem")
        for path, data in (
            (self.ca_path, self.ca_pem),
            (self.cert_path, self.cert_pem + self.ca_pem),
            (self.key_path, self.key_pem),
        ):
            with open(path, "wb") as file:
                file.write(data)

    def server_context(self) -> Any:
        """The server side, for C{listenSSL} and STARTTLS."""
        from twisted.internet.ssl import CertificateOptions

        return CertificateOptions(
            privateKey=self._key,  # type: ignore[arg-type]
            certificate=self._leaf,  # type: ignore[arg-type]
            extraCertChain=[self._ca],  # type: ignore[list-item]
        )

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA and checks host names."""
        context = ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))
        return context


_certificates: Optional[ThrowawayCertificates] = None
_certificates_lock = threading.Lock()


def throwaway_certificates() -> ThrowawayCertificates:
    """The process's certificates, made on first use."""
    global _certificates
    with _certificates_lock:
        if _certificates is None:
            _certificates = ThrowawayCertificates()
        return _certificates


# -- AUTH ------------------------------------------------------------------------
class _AcceptAnyChecker:
    """Every user name and password is right (a test server's "accept any")."""

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return succeed(credentials.username)


def _auth_policy(auth: Any, required: bool) -> Optional[AuthPolicy]:
    if auth is None:
        if required:
            raise ValueError("require_auth needs auth= (users or 'any')")
        return None
    if auth == "any":
        checker: Any = _AcceptAnyChecker()
        mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    elif isinstance(auth, dict):
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        for user, password in auth.items():
            checker.addUser(str(user).encode(), str(password).encode())
        mechanisms = ("PLAIN", "LOGIN", "CRAM-MD5")
    else:
        raise ValueError(f"auth must be a dict of users or 'any', not {auth!r}")
    # A test server: AUTH without TLS, no growing failure delays.
    return AuthPolicy.from_checkers(
        [checker],
        mechanisms=mechanisms,
        required=required,
        allow_without_tls=True,
        failure_delay=0,
    )


# -- what was received -----------------------------------------------------------
class ReceivedMessage(EmailMessage):
    """A message the server accepted, parsed, with its SMTP C{envelope}."""

    #: the L{Envelope}: mail_from, rcpt_tos, content (raw bytes), tls, auth...
    envelope: Envelope = None  # type: ignore[assignment]


_parser = BytesParser(_class=ReceivedMessage, policy=email.policy.default)


@dataclass
class SessionTranscript:
    """One connection's dialogue: C{S:} server, C{C:} client, C{*} events."""

    number: int
    peer: str
    lines: list[str] = field(default_factory=list)
    dropped: int = 0  # lines not kept past the cap

    def add(self, line: str) -> None:
        if len(self.lines) < _MAX_LINES:
            self.lines.append(line)
        else:
            self.dropped += 1

    def __str__(self) -> str:
        head = f"--- session {self.number} from {self.peer} ---"
        tail = [f"... {self.dropped} more lines not kept"] if self.dropped else []
        return "\n".join([head, *self.lines, *tail])


class _LineSplitter:
    """Bytes of one direction -> transcript lines (a partial line waits)."""

    def __init__(self, record: SessionTranscript, prefix: str) -> None:
        self._record = record
        self._prefix = prefix
        self._partial = b""

    def feed(self, data: bytes) -> None:
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            self._record.add(self._prefix + _text(line.rstrip(b"\r")))
        if len(self._partial) > 4096:
            self._record.add(self._prefix + _text(self._partial) + " [...]")
            self._partial = b""

    def close(self) -> None:
        if self._partial:
            self._record.add(self._prefix + _text(self._partial) + " [no CRLF]")
            self._partial = b""


def _text(line: bytes) -> str:
    return line.decode("utf-8", "backslashreplace")


# -- fault rules -----------------------------------------------------------------
Matcher = Union[str, "re.Pattern[str]", Callable[[str], bool], None]


@dataclass
class _Rule:
    phase: str
    action: str  # reply | delay | disconnect | hold
    match: Matcher = None
    nth: Optional[int] = None
    times: Optional[int] = None
    error: Optional[SMTPError] = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}")
        if isinstance(self.match, str):
            self.match = re.compile(self.match, re.IGNORECASE | re.MULTILINE)

    def applies(self, value: str, count: int) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.nth is not None and count != self.nth:
            return False
        match = self.match
        if match is None:
            return True
        if isinstance(match, re.Pattern):
            return match.search(value) is not None
        assert callable(match)
        return bool(match(value))


# -- the wire: transcript, throttling, dropping ----------------------------------
@implementer(IHandshakeListener)
class _RecordingProtocol(ProtocolWrapper):
    """Sits between the transport and the SMTP protocol.

    Records both directions (plaintext: it is above the TLS layer), paces
    both directions when the server is throttled, and can drop the
    connection without another byte.
    """

    factory: _RecordingFactory
    # TCP, TLS or a test transport; the methods used are on all of them.
    transport: Any

    def __init__(self, factory: _RecordingFactory, wrapped: Any) -> None:
        super().__init__(factory, wrapped)  # type: ignore[arg-type]
        self._server = factory.server
        self._reactor = factory.server.reactor
        self.record: Optional[SessionTranscript] = None
        self._client: Optional[_LineSplitter] = None
        self._replies: Optional[_LineSplitter] = None
        self.dropped = False
        self.lost: Deferred[None] = Deferred()
        self._out = bytearray()  # throttled output waiting
        self._in = bytearray()  # throttled input waiting
        self._out_call: Any = None
        self._in_call: Any = None
        self._out_ready = 0.0  # reactor time the next throttled chunk may go
        self._in_ready = 0.0
        self._close_after_output = False
        self._paused_by_protocol = False
        self._transport_paused = False

    def makeConnection(self, transport: Any) -> None:
        peer = transport.getPeer()
        self.key = (getattr(peer, "host", ""), getattr(peer, "port", 0))
        self.record = self._server._new_session(f"{self.key[0]}:{self.key[1]}")
        self._client = _LineSplitter(self.record, "C: ")
        self._replies = _LineSplitter(self.record, "S: ")
        if ISSLTransport.providedBy(transport):
            self._event("implicit TLS")
        ProtocolWrapper.makeConnection(self, transport)

    def _event(self, text: str) -> None:
        if self.record is not None:
            self._server._record(self.record, "* " + text)

    # Throttling: each direction moves a tick's worth of bytes at a time, and
    # the next chunk waits until the bytes sent so far fit the rate (over the
    # whole session, not only while a buffer is full).
    def _take(self, buffer: bytearray) -> bytes:
        rate = self._server.throttle_rate
        size = max(1, int(rate * _TICK)) if rate else len(buffer)
        chunk = bytes(buffer[:size])
        del buffer[:size]
        return chunk

    def _next_ready(self, ready: float, size: int) -> float:
        rate = self._server.throttle_rate
        if not rate:
            return 0.0
        return max(self._reactor.seconds(), ready) + size / rate

    # server -> client
    def write(self, data: bytes) -> None:
        if self.dropped or not data:
            return
        self._server._record_bytes(self._replies, data)
        if self._server.throttle_rate or self._out:
            self._out += data
            self._schedule_out()
        else:
            self.transport.write(data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def _schedule_out(self) -> None:
        if self._out_call is not None or not self._out or self.dropped:
            return
        wait = self._out_ready - self._reactor.seconds()
        if wait > 0:
            self._out_call = self._reactor.callLater(wait, self._pump_out)
        else:
            self._pump_out()

    def _pump_out(self) -> None:
        self._out_call = None
        chunk = self._take(self._out)
        if chunk:
            self._out_ready = self._next_ready(self._out_ready, len(chunk))
            self.transport.write(chunk)
        if self._out:
            self._schedule_out()
        elif self._close_after_output:
            self.transport.loseConnection()

    def loseConnection(self) -> None:
        self.disconnecting = 1
        if self._out:
            self._close_after_output = True
        else:
            self.transport.loseConnection()

    def startTLS(self, context: Any, normal: bool = True) -> None:
        # The 220 before the handshake must leave in plaintext, whole.
        if self._out:
            if self._out_call is not None:
                self._out_call.cancel()
                self._out_call = None
            self.transport.write(bytes(self._out))
            self._out.clear()
        self._event("STARTTLS: TLS handshake")
        self.transport.startTLS(context, normal)
        alsoProvides(self, ISSLTransport)

    def handshakeCompleted(self) -> None:
        self._event("TLS handshake done")
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    # client -> server
    def dataReceived(self, data: bytes) -> None:
        if self.dropped:
            return
        if self._server.throttle_rate or self._in:
            self._in += data
            self._update_pause()
            self._schedule_in()
            return
        self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        self._server._record_bytes(self._client, data)
        self.wrappedProtocol.dataReceived(data)

    def _schedule_in(self) -> None:
        if (
            self._in_call is not None
            or not self._in
            or self._paused_by_protocol
            or self.dropped
            or self.wrappedProtocol is None
        ):
            return
        wait = self._in_ready - self._reactor.seconds()
        if wait > 0:
            self._in_call = self._reactor.callLater(wait, self._pump_in)
        else:
            self._pump_in()

    def _pump_in(self) -> None:
        self._in_call = None
        if self.dropped or self._paused_by_protocol or self.wrappedProtocol is None:
            return
        chunk = self._take(self._in)
        self._in_ready = self._next_ready(self._in_ready, len(chunk))
        self._update_pause()
        if chunk:
            self._deliver(chunk)
        self._schedule_in()

    def pauseProducing(self) -> None:
        self._paused_by_protocol = True
        if self._in_call is not None:
            self._in_call.cancel()
            self._in_call = None
        self._update_pause()

    def resumeProducing(self) -> None:
        self._paused_by_protocol = False
        self._update_pause()
        self._schedule_in()

    def _update_pause(self) -> None:
        # Read nothing more from the socket while throttled input waits.
        want = self._paused_by_protocol or bool(self._in)
        if want != self._transport_paused and self.transport is not None:
            self._transport_paused = want
            if want:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def drop(self, why: str) -> None:
        """Close at once, without another byte (a fault rule)."""
        if self.dropped:
            return
        self._event(f"connection dropped: {why}")
        self.dropped = True
        self._cancel_pumps()
        self.transport.abortConnection()

    def abortConnection(self) -> None:
        self._cancel_pumps()
        self.transport.abortConnection()

    def _cancel_pumps(self) -> None:
        for call in (self._out_call, self._in_call):
            if call is not None and call.active():
                call.cancel()
        self._out_call = self._in_call = None
        self._out.clear()
        self._in.clear()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_pumps()
        if self._client is not None and self._replies is not None:
            self._server._close_splitters(self._client, self._replies)
        text = reason.getErrorMessage() if reason is not None else ""
        self._event(f"closed ({text})" if text else "closed")
        ProtocolWrapper.connectionLost(self, reason)
        lost, self.lost = self.lost, Deferred()
        lost.callback(None)


class _RecordingFactory(WrappingFactory):
    protocol = _RecordingProtocol
    noisy = False

    def __init__(self, server: SMTPTestServer, wrapped: SMTPFactory) -> None:
        super().__init__(wrapped)
        self.server = server
        self.by_peer: dict[tuple[str, int], _RecordingProtocol] = {}

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.by_peer[p.key] = p

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        key = p.key
        if self.by_peer.get(key) is p:
            del self.by_peer[key]


# -- the handler -----------------------------------------------------------------
class _TestHandler:
    """Applies the fault rules at each phase, then keeps the message."""

    def __init__(self, server: SMTPTestServer) -> None:
        self._server = server

    def check_client(self, peer: Any) -> Any:
        return self._server._apply("connect", getattr(peer, "host", ""), peer)

    def check_sender(self, envelope: Envelope) -> Any:
        return self._server._apply("mail", envelope.mail_from, envelope.peer)

    def check_recipient(
        self, envelope: Envelope, address: str, options: dict[str, Optional[str]]
    ) -> Any:
        server = self._server
        return server._apply(
            "rcpt",
            address,
            envelope.peer,
            lambda: server._greylist_check(envelope, address),
        )

    def handle_message(self, envelope: Envelope) -> Any:
        server = self._server
        return server._apply(
            "data",
            envelope.content.decode("utf-8", "replace"),
            envelope.peer,
            lambda: server._keep(envelope),
        )


# -- the server ------------------------------------------------------------------
class SMTPTestServer:
    """A real SMTP server on 127.0.0.1 for one test (or a whole run).

    Made by L{start_server}, the pytest fixtures or L{SMTPServerMixin}; see
    those for the options.
    """

    __test__ = False

    def __init__(
        self,
        reactor: Any,
        thread: Optional[_ReactorThread] = None,
        *,
        hostname: str = "localhost",
        tls: Optional[str] = None,
        require_tls: bool = False,
        auth: Any = None,
        require_auth: bool = False,
        max_message_size: Optional[int] = None,
        max_recipients: Optional[int] = None,
        limits: Optional[Limits] = None,
        debug: bool = False,
    ) -> None:
        if tls not in (None, "starttls", "implicit"):
            raise ValueError("tls must be None, 'starttls' or 'implicit'")
        if require_tls and tls is None:
            raise ValueError("require_tls needs tls='starttls' or 'implicit'")
        self.reactor = reactor
        self._thread = thread
        self.tls = tls
        self.hostname = hostname
        limits = limits or Limits()
        changes: dict[str, Any] = {}
        if max_message_size is not None:
            changes["max_message_size"] = max_message_size
        if max_recipients is not None:
            changes["max_recipients"] = max_recipients
        if changes:
            limits = dataclasses.replace(limits, **changes)
        self.certificates = throwaway_certificates() if tls else None
        tls_policy = None
        if tls == "starttls":
            assert self.certificates is not None
            tls_policy = TLSPolicy(self.certificates.server_context(), require_tls)
        self.smtp_factory = SMTPFactory(
            _TestHandler(self),
            hostname=hostname,
            app_name="twisted_smtpd test server",
            limits=limits,
            tls=tls_policy,
            auth=_auth_policy(auth, require_auth),
            debug=debug,
            quiet=True,
            reactor=reactor,
        )
        # implicit TLS with require_tls: every session is TLS anyway
        self._factory = _RecordingFactory(self, self.smtp_factory)
        self._lock = threading.Condition()
        self._messages: list[ReceivedMessage] = []
        self._sessions: list[SessionTranscript] = []
        self._session_count = 0
        self._rules: list[_Rule] = []
        self._counts: Counter[str] = Counter()
        self._greylist: Optional[tuple[SMTPError, set[tuple[str, str, str]]]] = None
        # reactor mode: (Deferred, ready(), timeout call) per wait_for/wait_held
        self._waiters: list[tuple[Deferred[Any], Callable[[], Any], Any]] = []
        self._held: list[Deferred[None]] = []  # replies hold() rules hold
        self._delays: dict[Deferred[Any], Any] = {}  # held replies, their timers
        #: bytes per second both ways, for new and open sessions; None: full speed
        self.throttle_rate: Optional[float] = None
        self._port: Any = None
        self.host = "127.0.0.1"
        self.port = 0

    def __repr__(self) -> str:
        mode = "thread" if self.threaded else "reactor"
        return (
            f"<SMTPTestServer {self.host}:{self.port} {mode} mode,"
            f" {len(self._messages)} message(s), {len(self._sessions)} session(s)>"
        )

    # -- running -----------------------------------------------------------------
    def _listen(self) -> None:
        if self.tls == "implicit":
            assert self.certificates is not None
            from twisted.protocols.tls import TLSMemoryBIOFactory

            # listenSSL would batch TLS writes on the global reactor's clock.
            tls_factory = TLSMemoryBIOFactory(
                alpn_safe(self.certificates.server_context()),
                False,
                self._factory,
                clock=self.reactor,
            )
            self._port = self.reactor.listenTCP(0, tls_factory, interface=self.host)
        else:
            self._port = self.reactor.listenTCP(0, self._factory, interface=self.host)
        self.port = self._port.getHost().port

    @property
    def threaded(self) -> bool:
        """Whether the server runs in the background reactor thread."""
        return self._thread is not None

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run C{fn} in the server's reactor: waits in thread mode."""
        if self._thread is not None:
            return self._thread.call(fn, *args)
        return fn(*args)

    def stop(self) -> Any:
        """Stop listening and close every session.

        Thread mode: returns when done.  Reactor mode: returns a Deferred.
        """
        return self._call(self._stop_in_reactor)

    def _stop_in_reactor(self) -> Deferred[Any]:
        # A reply still held by a delay rule: answer it (the session is about
        # to be closed) rather than cancel it, which the protocol would log as
        # a handler failure (an error in trial).
        delays, self._delays = self._delays, {}
        for delayed, call in delays.items():
            call.cancel()
            delayed.errback(SMTPError(421, "4.3.2", "Test server stopping"))
        with self._lock:
            held, self._held = self._held, []
        for deferred in held:
            deferred.errback(SMTPError(421, "4.3.2", "Test server stopping"))
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for deferred, _ready, timer in waiters:
            if timer.active():
                timer.cancel()
            deferred.errback(RuntimeError("the SMTP test server stopped"))
        waits: list[Deferred[Any]] = []
        if self._port is not None:
            port, self._port = self._port, None
            waits.append(_as_deferred(port.stopListening()))
        for connection in list(self._factory.protocols):
            waits.append(connection.lost)
            connection.abortConnection()
        return DeferredList(waits, consumeErrors=True)

    # -- what came in --------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def messages(self) -> list[ReceivedMessage]:
        """The accepted messages, oldest first (a copy)."""
        with self._lock:
            return list(self._messages)

    @property
    def sessions(self) -> list[SessionTranscript]:
        """Every session's transcript so far, oldest first."""
        with self._lock:
            return [
                SessionTranscript(s.number, s.peer, list(s.lines), s.dropped)
                for s in self._sessions
            ]

    @property
    def transcript(self) -> str:
        """Every session's dialogue as text (C{S:} server, C{C:} client)."""
        return "\n".join(str(session) for session in self.sessions)

    @property
    def ca_path(self) -> Optional[str]:
        """The CA certificate file to trust (TLS servers), else None."""
        return self.certificates.ca_path if self.certificates else None

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """A new client C{SSLContext} that verifies this server's certificate."""
        if self.certificates is None:
            raise ValueError("this server has no TLS (start it with tls=...)")
        return self.certificates.client_context()

    def wait_for(
        self,
        count: int = 1,
        timeout: float = 5.0,
        match: Optional[Callable[[ReceivedMessage], bool]] = None,
    ) -> Any:
        """The accepted messages (those C{match} accepts) once there are C{count}.

        Thread mode: blocks, returns the list, raises C{TimeoutError} after
        C{timeout} seconds.  Reactor mode: a Deferred that fires with the
        list or fails with C{TimeoutError}.
        """

        def ready() -> Optional[list[ReceivedMessage]]:
            found = self._matching(match)
            return found if len(found) >= count else None

        def failed() -> str:
            return (
                f"waited {timeout} s for {count} message(s) on"
                f" {self.host}:{self.port}, got {len(self._matching(match))}"
                f" ({len(self._messages)} in all, {len(self._sessions)} session(s))"
            )

        return self._wait(ready, timeout, failed)

    def wait_held(self, count: int = 1, timeout: float = 5.0) -> Any:
        """Wait until C{count} replies are held by C{hold()} rules.

        Returns the number held; blocks (thread mode) or is a Deferred
        (reactor mode), like C{wait_for}.
        """

        def ready() -> Optional[int]:
            return len(self._held) if len(self._held) >= count else None

        def failed() -> str:
            return f"waited {timeout} s for {count} held replies, got {len(self._held)}"

        return self._wait(ready, timeout, failed)

    @property
    def held(self) -> int:
        """How many replies C{hold()} rules hold now."""
        with self._lock:
            return len(self._held)

    def _matching(self, match: Any) -> list[ReceivedMessage]:
        if match is None:
            return list(self._messages)
        return [m for m in self._messages if match(m)]

    def _wait(
        self,
        ready: Callable[[], Any],
        timeout: float,
        failed: Callable[[], str],
    ) -> Any:
        """C{ready()}'s first result that is not None (checked on each change)."""
        if self._thread is None:
            result = ready()
            if result is not None:
                return succeed(result)
            deferred: Deferred[Any] = Deferred()
            entry: Any = None

            def expired() -> None:
                self._waiters.remove(entry)
                deferred.errback(TimeoutError(failed()))

            entry = (deferred, ready, self.reactor.callLater(timeout, expired))
            self._waiters.append(entry)
            return deferred
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                result = ready()
                if result is not None:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(failed())
                self._lock.wait(left)

    def _changed(self) -> None:
        """Something a waiter may wait for happened (in the reactor)."""
        with self._lock:
            self._lock.notify_all()
            waiters = list(self._waiters)
        for entry in waiters:
            deferred, ready, timer = entry
            result = ready()
            if result is not None:
                self._waiters.remove(entry)
                timer.cancel()
                deferred.callback(result)

    def clear(self) -> None:
        """Forget messages, transcripts and phase counts (fault rules stay)."""
        with self._lock:
            self._messages.clear()
            self._sessions.clear()
            self._counts.clear()
            if self._greylist is not None:
                self._greylist[1].clear()

    def reset(self) -> None:
        """C{clear()}, and remove every fault rule, greylisting and throttling."""
        self.clear_faults()
        self.clear()

    # -- faults --------------------------------------------------------------------
    def fail(
        self,
        phase: str,
        code: int,
        enhanced: str = "",
        text: Optional[str] = None,
        *,
        match: Matcher = None,
        nth: Optional[int] = None,
        times: Optional[int] = None,
    ) -> None:
        """Answer C{code enhanced text} at C{phase} instead of accepting.

        Args:
            phase: C{connect} (instead of the greeting, then close),
                C{mail}, C{rcpt} or C{data} (after the final dot).
            match: a regular expression searched (case-insensitive) in the
                client IP (connect), the sender (mail), the recipient (rcpt)
                or the message text (data) -- or a callable taking that text.
            nth: only the Nth time the phase is reached (1-based, counted
                since start or C{clear()}): "fail the 3rd message".
            times: act this many times, then never again: C{times=1} is
                "fail once, then accept".
        """
        self._add(
            _Rule(
                phase,
                "reply",
                match,
                nth,
                times,
                error=SMTPError(code, enhanced, text),
            )
        )

    def delay(
        self,
        phase: str,
        seconds: float,
        *,
        match: Matcher = None,
        nth: Optional[int] = None,
        times: Optional[int] = None,
    ) -> None:
        """Hold the reply at C{phase} for C{seconds} (then answer as usual)."""
        self._add(_Rule(phase, "delay", match, nth, times, seconds=seconds))

    def disconnect(
        self,
        phase: str,
        *,
        match: Matcher = None,
        nth: Optional[int] = None,
        times: Optional[int] = None,
    ) -> None:
        """Drop the connection at C{phase}, without a reply.

        At C{data} this is after the final dot, before the reply: the
        client cannot know whether the message was taken (it was not).
        """
        self._add(_Rule(phase, "disconnect", match, nth, times))

    def hold(
        self,
        phase: str,
        *,
        match: Matcher = None,
        nth: Optional[int] = None,
        times: Optional[int] = None,
    ) -> None:
        """Hold the reply at C{phase} until C{release()} (no timer involved).

        C{wait_held(n)} waits until n replies are held: the client is then
        known to be waiting, and the test can look at it before releasing.
        """
        self._add(_Rule(phase, "hold", match, nth, times))

    def release(self) -> int:
        """Let every held reply go on (as the other rules say); how many."""
        return int(self._call(self._release_in_reactor))

    def _release_in_reactor(self) -> int:
        with self._lock:
            held, self._held = self._held, []
        for deferred in held:
            deferred.callback(None)
        return len(held)

    def throttle(self, bytes_per_second: Optional[float]) -> None:
        """Move at most this many bytes per second each way (None: no limit)."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive")
        self.throttle_rate = bytes_per_second

    def greylist(
        self,
        code: int = 451,
        enhanced: str = "4.7.1",
        text: str = "Greylisted, please try again later",
    ) -> None:
        """Refuse each new (client IP, sender, recipient) once at RCPT."""
        with self._lock:
            self._greylist = (SMTPError(code, enhanced, text), set())

    def clear_faults(self) -> None:
        """Remove every fault rule, greylisting and throttling."""
        with self._lock:
            self._rules.clear()
            self._greylist = None
        self.throttle_rate = None

    def _add(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    # -- in the reactor: sessions, rules, messages ---------------------------------
    def _new_session(self, peer: str) -> SessionTranscript:
        with self._lock:
            self._session_count += 1
            record = SessionTranscript(self._session_count, peer)
            self._sessions.append(record)
            return record

    def _record(self, record: SessionTranscript, line: str) -> None:
        with self._lock:
            record.add(line)

    def _record_bytes(self, splitter: Any, data: bytes) -> None:
        with self._lock:
            splitter.feed(data)

    def _close_splitters(self, *splitters: _LineSplitter) -> None:
        with self._lock:
            for splitter in splitters:
                splitter.close()

    def _apply(
        self,
        phase: str,
        value: str,
        peer: Any,
        then: Optional[Callable[[], Any]] = None,
    ) -> Any:
        """The rules for this phase: a delay, then a reply/drop or C{then()}."""
        delay = 0.0
        hold = False
        final: Optional[_Rule] = None
        with self._lock:
            self._counts[phase] += 1
            count = self._counts[phase]
            for rule in self._rules:
                if rule.phase != phase:
                    continue
                stacking = rule.action in ("delay", "hold")
                if not stacking and final is not None:
                    continue
                if not rule.applies(value, count):
                    continue
                if rule.times is not None:
                    rule.times -= 1
                if rule.action == "delay":
                    delay += rule.seconds
                elif rule.action == "hold":
                    hold = True
                else:
                    final = rule

        def act() -> Any:
            if final is not None:
                assert final.error is not None or final.action == "disconnect"
                if final.action == "disconnect":
                    self._drop(peer, f"fault rule at {phase}")
                    # Never sent: the connection is gone.
                    raise SMTPError(421, "4.4.2", "Connection dropped (fault rule)")
                assert final.error is not None
                raise SMTPError(final.error.reply)
            return then() if then is not None else None

        def after_hold(_: Any = None) -> Any:
            if delay <= 0:
                return act()
            delayed: Deferred[Any] = Deferred()

            def fire() -> None:
                del self._delays[delayed]
                maybeDeferred(act).chainDeferred(delayed)

            self._delays[delayed] = self.reactor.callLater(delay, fire)
            return delayed

        if not hold:
            return after_hold()
        held: Deferred[None] = Deferred()
        with self._lock:
            self._held.append(held)
        self._changed()
        return held.addCallback(after_hold)

    def _drop(self, peer: Any, why: str) -> None:
        key = (getattr(peer, "host", ""), getattr(peer, "port", 0))
        connection = self._factory.by_peer.get(key)
        if connection is not None:
            connection.drop(why)

    def _greylist_check(self, envelope: Envelope, address: str) -> None:
        with self._lock:
            if self._greylist is None:
                return
            error, seen = self._greylist
            key = (
                str(getattr(envelope.peer, "host", "")),
                envelope.mail_from.lower(),
                address.lower(),
            )
            if key in seen:
                return
            seen.add(key)
        raise SMTPError(error.reply)

    def _keep(self, envelope: Envelope) -> None:
        # Parsed with LF line ends (as Python writes them); the wire bytes stay
        # in envelope.content.
        message: ReceivedMessage = _parser.parsebytes(
            envelope.content.replace(b"\r\n", b"\n")
        )  # type: ignore[assignment]
        message.envelope = envelope
        with self._lock:
            self._messages.append(message)
        self._changed()


def _as_deferred(value: Any) -> Deferred[Any]:
    return value if isinstance(value, Deferred) else succeed(value)


# -- the background reactor ------------------------------------------------------
class _ReactorThread:
    """A private reactor (never the global one) running in a daemon thread."""

    def __init__(self) -> None:
        _patch_tls_clock()
        self.reactor = _new_reactor()
        started = threading.Event()
        self.reactor.callWhenRunning(started.set)
        self.thread = threading.Thread(
            target=self.reactor.run,
            kwargs={"installSignalHandlers": False},
            name="twisted_smtpd test server reactor",
            daemon=True,
        )
        self.thread.start()
        if not started.wait(10):
            raise RuntimeError("the test server's reactor thread did not start")

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        from twisted.internet.threads import blockingCallFromThread

        if threading.current_thread() is self.thread:
            raise RuntimeError("blocking call from the server's own reactor thread")
        return blockingCallFromThread(self.reactor, fn, *args)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.reactor.callFromThread(self.reactor.stop)
            self.thread.join(10)


def _patch_tls_clock() -> None:
    """Make STARTTLS in our reactor thread schedule its writes on our reactor.

    Twisted's TLS layer batches small writes with a C{callLater(0)} on a
    clock it takes from C{twisted.protocols.tls._get_default_clock}: the
    global reactor.  C{transport.startTLS} gives no way to pass another, so
    a private reactor's STARTTLS sessions would wait for a reactor that is
    not theirs.  The patch answers "this thread's reactor" in our thread and
    defers to Twisted everywhere else.
    """
    from twisted.protocols import tls

    original = getattr(tls, "_get_default_clock", None)
    if original is None or getattr(original, "_twisted_smtpd", False):
        return  # an older Twisted without write batching, or done already

    def clock_for_this_thread() -> Any:
        thread = _thread
        if thread is not None and threading.current_thread() is thread.thread:
            return thread.reactor
        return original()

    clock_for_this_thread._twisted_smtpd = True  # type: ignore[attr-defined]
    tls._get_default_clock = clock_for_this_thread


def _new_reactor() -> Any:
    try:
        from twisted.internet.epollreactor import EPollReactor

        return EPollReactor()
    except ImportError:  # not Linux
        from twisted.internet.selectreactor import SelectReactor

        return SelectReactor()


_thread: Optional[_ReactorThread] = None
_thread_lock = threading.Lock()


def reactor_thread() -> _ReactorThread:
    """The process's background reactor thread, started on first use."""
    global _thread
    with _thread_lock:
        if _thread is None or not _thread.thread.is_alive():
            _thread = _ReactorThread()
        return _thread


def stop_reactor_thread() -> None:
    """Stop the background reactor thread, if one runs (end of a test run)."""
    global _thread
    with _thread_lock:
        thread, _thread = _thread, None
    if thread is not None:
        thread.stop()


atexit.register(stop_reactor_thread)


def start_server(
    mode: str = "thread", reactor: Any = None, **options: Any
) -> SMTPTestServer:
    """Start an L{SMTPTestServer} on 127.0.0.1 and a free port.

    Args:
        mode: C{"thread"} (a private reactor in a background thread) or
            C{"reactor"} (C{reactor}, default the global one, already running
            or about to: pytest-twisted, trial).
        hostname: the greeting and EHLO name (default C{localhost}).
        tls: C{None}, C{"starttls"} or C{"implicit"}, with a throw-away
            certificate; C{server.ssl_context} verifies it.
        require_tls: refuse mail before STARTTLS.
        auth: a dict of user names and passwords, or C{"any"} to accept
            any; AUTH is offered without TLS too.
        require_auth: refuse mail before AUTH.
        max_message_size, max_recipients: limits (see L{Limits}).
        limits: a whole L{Limits}.
        debug: also log the dialogue through C{twisted.logger}.
    """
    if mode == "thread":
        thread = reactor_thread()
        server = SMTPTestServer(thread.reactor, thread, **options)
        thread.call(server._listen)
        return server
    if mode != "reactor":
        raise ValueError("mode must be 'thread' or 'reactor'")
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    server = SMTPTestServer(reactor, None, **options)
    server._listen()
    return server


class SMTPServerMixin:
    """For C{twisted.trial.unittest.TestCase}: a server in trial's reactor::

        class SignupTests(SMTPServerMixin, unittest.TestCase):
            @defer.inlineCallbacks
            def test_welcome_mail(self):
                smtpd = self.start_smtpd()
                yield send_welcome(smtpd.host, smtpd.port)
                [message] = yield smtpd.wait_for(1)

    The server stops after the test; its transcript is logged then (trial
    writes it to C{_trial_temp/test.log}).
    """

    def start_smtpd(self, **options: Any) -> SMTPTestServer:
        server = start_server(mode="reactor", **options)

        def stop() -> Deferred[Any]:
            _log.info(
                "smtpd test server transcript:\n{transcript}",
                transcript=server.transcript,
            )
            return server.stop()

        self.addCleanup(stop)  # type: ignore[attr-defined]
        return server
