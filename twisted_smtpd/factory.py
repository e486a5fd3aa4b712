# -*- test-case-name: tests.test_factory -*-
"""
L{SMTPFactory}: the policy (hostname, limits, TLS, AUTH) and the handler.
"""

from __future__ import annotations

import os
import socket
from base64 import b32encode
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from ._deadlines import Deadlines, IdleTimers
from ._delivery import HandlerHooks
from ._events import SessionEvents
from ._ratelimit import FailureLimiter, parse_limit
from ._session import Envelope, Limits, Session, received_header
from ._xclient import ATTRIBUTES as XCLIENT_ATTRIBUTES
from ._xclient import AddressList
from .protocol import LMTPServerProtocol, SMTPServerProtocol
from .replies import (
    R220_LMTP_READY,
    R220_READY,
    R250_HELO,
    R421_AUTH_RATE_LIMITED,
    R421_SHUTTING_DOWN,
    R421_TOO_MANY_CONNECTIONS,
    Reply,
    fill,
)

if TYPE_CHECKING:
    from .tls import TLSPolicy

__all__ = ["SMTPFactory"]

#: HELO/EHLO replies kept (each encoded once); past it the cache starts over
_HELO_CACHE_SIZE = 512


class SMTPFactory(ServerFactory):
    """Builds one L{SMTPServerProtocol} per connection, all sharing this policy.

    Args:
        handler: a callable taking an L{Envelope}, or an object with the hooks of
            L{twisted_smtpd.interfaces.Handler}.
        hostname: for the greeting, EHLO and C{Received:}; default the FQDN
            (looked up once, here, never per connection).
        app_name: shown in the greeting and C{Received:}.
        limits: a L{Limits}; the defaults suit a public MX.
        tls: a L{TLSPolicy <twisted_smtpd.tls.TLSPolicy>} to offer STARTTLS
            and/or require TLS.
        auth: an L{AuthPolicy <twisted_smtpd.auth.AuthPolicy>} to offer AUTH.
        debug: log the dialogue (AUTH payloads masked).
        quiet: no log line per session or per accepted message (high
            volume); refusals, failures and errors are still logged.
        reactor: the reactor for timeouts and threads; default the global one.
        events: a L{SessionEvents <twisted_smtpd._events.SessionEvents>} told
            of sessions, replies, messages, hooks, TLS and AUTH (metrics).
        xclient_hosts: networks (CIDR strings) whose clients may send XCLIENT
            to say who the real client is (a proxy in front); default nobody.
        reverse_dns: a L{ReverseDNS <twisted_smtpd.rdns.ReverseDNS>} to name
            clients (C{Received:}, C{envelope.peer_name}); None: no lookups.
        auth_failure_limit: failed AUTHs per client address across
            connections, as C{(N, SECONDS)}, C{"N/SECONDS"} or a
            L{FailureLimiter <twisted_smtpd._ratelimit.FailureLimiter>};
            past it AUTH gets 454 4.7.0 for SECONDS (and, with AUTH required,
            connections 421).  None turns it off.
        lmtp: serve LMTP (RFC 2033) with L{LMTPServerProtocol}: LHLO, and one
            reply per recipient after the data.
    """

    protocol = SMTPServerProtocol
    noisy = False
    _log = Logger()

    def __init__(
        self,
        handler: Any,
        *,
        hostname: Optional[str] = None,
        app_name: str = "twisted_smtpd",
        limits: Optional[Limits] = None,
        tls: Optional[TLSPolicy] = None,
        auth: Any = None,
        debug: bool = False,
        quiet: bool = False,
        reactor: Optional[IReactorTime] = None,
        events: Optional[SessionEvents] = None,
        xclient_hosts: Iterable[str] = (),
        reverse_dns: Any = None,
        auth_failure_limit: Any = (10, 600.0),
        lmtp: bool = False,
    ) -> None:
        self.lmtp = lmtp
        if lmtp:
            if self.protocol is SMTPServerProtocol:
                self.protocol = LMTPServerProtocol
            elif not issubclass(self.protocol, LMTPServerProtocol):
                raise TypeError(
                    f"lmtp=True needs a protocol derived from LMTPServerProtocol,"
                    f" not {self.protocol.__name__}"
                )
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        self.events = events
        self.handler = handler
        self.hooks = HandlerHooks(handler)
        #: DSN (RFC 3461) is offered only if the handler honours it: a
        #: C{supports_dsn = True} attribute (hand-off targets that pass the
        #: parameters on); a Maildir sends no delivery reports.
        self.dsn = bool(getattr(handler, "supports_dsn", False))
        self.hostname = hostname or socket.getfqdn()
        self.app_name = app_name
        self.limits = limits or Limits()
        self.tls = tls
        self.auth = auth
        self.debug = debug
        self.quiet = quiet
        self.sessions: set[SMTPServerProtocol] = set()
        self._deadlines: Optional[Deadlines] = None  # max_session_time, one timer
        self._idle_timers: Optional[IdleTimers] = None  # every idle timeout
        self._per_ip: Counter[str] = Counter()
        self._ehlo_cache: dict[tuple[str, ...], bytes] = {}
        self._helo_cache: dict[tuple[str, str], Reply] = {}
        self._greeting: Optional[tuple[tuple[str, str], Reply]] = None
        self.shutting_down = False
        self._drained: Optional[Deferred[None]] = None
        self._grace_call: Any = None
        self._id_prefix = b32encode(os.urandom(5)).decode("ascii")
        self._id_counter = 0
        self.xclient_hosts = (
            xclient_hosts
            if isinstance(xclient_hosts, AddressList)
            else AddressList(xclient_hosts)
        )
        self.reverse_dns = reverse_dns
        self.auth_limiter = _limiter(auth_failure_limit, reactor.seconds)

    # -- policy the protocol asks for -----------------------------------------
    @property
    def tls_context(self) -> Any:
        return self.tls.context_factory if self.tls is not None else None

    @property
    def tls_required(self) -> bool:
        return self.tls is not None and self.tls.required

    @property
    def auth_required(self) -> bool:
        return self.auth is not None and self.auth.required

    @property
    def greeting(self) -> Reply:
        """The 220 banner (built once per hostname and app name)."""
        key = (self.hostname, self.app_name)
        if self._greeting is None or self._greeting[0] != key:
            self._greeting = (
                key,
                fill(
                    R220_LMTP_READY if self.lmtp else R220_READY,
                    hostname=self.hostname,
                    app=self.app_name,
                ),
            )
        return self._greeting[1]

    def helo_reply(self, name: str) -> Reply:
        """The 250 to HELO/EHLO C{name} (cached: clients mostly send one name)."""
        key = (self.hostname, name)
        reply = self._helo_cache.get(key)
        if reply is None:
            if len(self._helo_cache) >= _HELO_CACHE_SIZE:
                self._helo_cache.clear()  # names are the client's: stay bounded
            reply = fill(R250_HELO, hostname=self.hostname, name=name)
            self._helo_cache[key] = reply
        return reply

    def ehlo_keywords(self, session: Session) -> bytes:
        """The EHLO reply after its first line, as bytes (cached per variant)."""
        keywords = self.extensions(session)
        key = tuple(keywords)
        data = self._ehlo_cache.get(key)
        if data is None:
            last = len(keywords) - 1
            data = "".join(
                f"250{' ' if i == last else '-'}{keyword}\r\n"
                for i, keyword in enumerate(keywords)
            ).encode("ascii")
            self._ehlo_cache[key] = data
        return data

    def extensions(self, session: Session) -> list[str]:
        """The EHLO keywords for this session, in a stable order."""
        size = self.limits.max_message_size
        keywords = [
            "PIPELINING",
            f"SIZE {size}" if size else "SIZE",
            "8BITMIME",
            "CHUNKING",
            *(["DSN"] if self.dsn else []),
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ]
        if self.tls_context is not None and session.tls is None:
            keywords.append("STARTTLS")
        if self.auth is not None:
            mechanisms = self.auth.advertised(session)
            if mechanisms:
                keywords.append("AUTH " + " ".join(mechanisms))
        if session.xclient_allowed:
            keywords.append("XCLIENT " + " ".join(XCLIENT_ATTRIBUTES))
        keywords.append("HELP")
        return keywords

    def received_header(self, envelope: Envelope) -> bytes:
        return received_header(
            envelope, self.hostname, self.app_name, envelope.received_at
        )

    def new_session_id(self) -> str:
        self._id_counter += 1
        return f"{self._id_prefix}{self._id_counter:06X}"

    # -- connection accounting -------------------------------------------------
    def admit(self, protocol: SMTPServerProtocol) -> Optional[Reply]:
        """Register a new session; the 421 to refuse it with, if over a limit."""
        if self.shutting_down:
            return self._refuse("shutting_down", R421_SHUTTING_DOWN)
        limits = self.limits
        if limits.max_connections and len(self.sessions) >= limits.max_connections:
            return self._refuse("max_connections", R421_TOO_MANY_CONNECTIONS)
        ip = _client_address(protocol)
        per_ip = self._per_ip
        count = per_ip.get(ip, 0)  # (not per_ip[ip]: Counter's __missing__)
        limit = limits.max_connections_per_ip
        if limit and count >= limit:
            return self._refuse("max_connections_per_ip", R421_TOO_MANY_CONNECTIONS)
        if self.auth is not None and self.auth_locked_out(ip):  # (no AUTH: never)
            return self._refuse("auth_rate_limit", R421_AUTH_RATE_LIMITED)
        self.sessions.add(protocol)
        per_ip[ip] = count + 1
        if limits.max_session_time:
            deadlines = self._deadlines
            if deadlines is None:
                deadlines = self.session_deadlines
            deadlines.add(protocol, limits.max_session_time)
        return None

    @property
    def session_deadlines(self) -> Deadlines:
        """Every admitted session's C{max_session_time}, on one timer."""
        if self._deadlines is None:
            self._deadlines = Deadlines(self.reactor, _session_expired)
        return self._deadlines

    @property
    def idle_timers(self) -> IdleTimers:
        """Every session's idle timeout, on one timer (made on first use, so
        that a reactor set after the factory was made is the one used)."""
        timers = self._idle_timers
        if timers is None:
            timers = self._idle_timers = IdleTimers(self.reactor, _idle_expired)
        return timers

    def auth_locked_out(self, ip: str) -> bool:
        """AUTH is required and C{ip} is over the AUTH failure limit: refuse it."""
        limiter = self.auth_limiter
        return limiter is not None and self.auth_required and limiter.blocked(ip)

    def readmit(self, protocol: SMTPServerProtocol, old_ip: str) -> Optional[Reply]:
        """XCLIENT named another client: count the session under its address.

        The 421 if the forwarded client is over a per-address limit.
        """
        ip = _client_address(protocol)
        if ip == old_ip or protocol not in self.sessions:
            return None
        self._per_ip[old_ip] -= 1
        if self._per_ip[old_ip] <= 0:
            del self._per_ip[old_ip]
        self._per_ip[ip] += 1
        limit = self.limits.max_connections_per_ip
        if limit and self._per_ip[ip] > limit:
            return self._refuse("max_connections_per_ip", R421_TOO_MANY_CONNECTIONS)
        if self.auth_locked_out(ip):
            return self._refuse("auth_rate_limit", R421_AUTH_RATE_LIMITED)
        return None

    def _refuse(self, reason: str, reply: Reply) -> Reply:
        if self.events is not None:
            self.events.connection_refused(reason)
        return fill(reply, hostname=self.hostname)

    def release(self, protocol: SMTPServerProtocol) -> None:
        sessions = self.sessions
        if protocol in sessions:
            sessions.remove(protocol)
            if self._deadlines is not None:
                self._deadlines.discard(protocol)
            ip = _client_address(protocol)
            per_ip = self._per_ip
            count = per_ip.get(ip, 0) - 1
            if count > 0:
                per_ip[ip] = count
            else:
                per_ip.pop(ip, None)
        if self._drained is not None and not sessions:
            drained, self._drained = self._drained, None
            if self._grace_call is not None and self._grace_call.active():
                self._grace_call.cancel()
            drained.callback(None)

    def shutdown(self, grace: float = 30.0) -> Deferred[None]:
        """Close every session; those with a message in flight get C{grace} seconds.

        Idle sessions get 421 4.3.2 at once; a session reading a message or
        waiting for its handler gets its reply first, then 421.  Fires when all
        sessions are closed.
        """
        self.shutting_down = True
        for protocol in list(self.sessions):
            protocol.shutdown()
        if not self.sessions:
            return succeed(None)
        if self._drained is None:
            self._drained = Deferred()
            self._grace_call = self.reactor.callLater(grace, self._force_close)
        # Every caller gets its own Deferred, fired when the sessions are gone.
        drained: Deferred[None] = Deferred()

        def notify(result: object) -> object:
            drained.callback(None)
            return result

        self._drained.addBoth(notify)
        return drained

    def _force_close(self) -> None:
        if self.sessions:
            self._log.info(
                "smtpd: grace period over, closing {count} sessions",
                count=len(self.sessions),
            )
        for protocol in list(self.sessions):
            protocol.force_close()

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:
        protocol = self.protocol(self)
        protocol._built_peer = addr  # getPeer()'s value on a plain TCP server
        return protocol


def _session_expired(protocol: SMTPServerProtocol) -> None:
    protocol._session_expired()


def _idle_expired(protocol: SMTPServerProtocol) -> None:
    protocol._idle_due()


def _client_address(protocol: SMTPServerProtocol) -> str:
    """The per-IP limit's key: the peer's host (the real one behind PROXY)."""
    return str(getattr(protocol.session.peer, "host", ""))


def _limiter(limit: Any, clock: Any) -> Optional[FailureLimiter]:
    if limit is None or isinstance(limit, FailureLimiter):
        return limit
    count, window = parse_limit(limit) if isinstance(limit, str) else limit
    return FailureLimiter(count, window, clock)
