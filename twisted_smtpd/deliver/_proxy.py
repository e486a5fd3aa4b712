# -*- test-case-name: tests.test_deliver_proxy -*-
"""
The downstream half of a proxied transaction, shared by the LMTP and SMTP
targets.

Each client transaction borrows one downstream connection from a bounded
L{ConnectionPool} at MAIL and runs its own transaction there beside the
client's: MAIL and every RCPT are forwarded as they come and the
downstream's refusal is the client's reply; the body streams to the
downstream's DATA (dot-stuffed) with back-pressure; the client's 250 comes
only after the downstream's final reply.

No maintained library speaks proxy-style SMTP for Twisted
(C{twisted.mail.smtp.ESMTPClient} sends whole messages it owns), so the
client side is a small L{LineReceiver} with a reply parser.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from OpenSSL.SSL import Error as TLSError
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import _parse, clientFromString
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from .._session import Envelope
from ..replies import Reply, SMTPError

__all__ = [
    "DownstreamReply",
    "DownstreamError",
    "DownstreamProtocol",
    "ConnectionPool",
    "ProxyHandler",
    "Endpoint",
    "parse_endpoint",
    "combine_lmtp_replies",
]

_log = Logger(namespace="twisted_smtpd.deliver")

_LINE_END = re.compile(rb"\r\n|\r|\n")
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
#: bytes the client may send before the downstream's 354 before it is paused
_MAX_EARLY_BODY = 256 * 1024


# -- replies ---------------------------------------------------------------------
@dataclass(frozen=True)
class DownstreamReply:
    """One reply from the next hop, enhanced code split off."""

    code: int
    enhanced: str
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def as_reply(self) -> Reply:
        """This reply as ours: same code and text (421 becomes 451: only we
        decide when our client's session closes)."""
        code = 451 if self.code == 421 else self.code
        if not 400 <= code < 600:
            code = 451
        enhanced = self.enhanced
        if not enhanced or enhanced[0] != str(code)[0]:
            enhanced = f"{code // 100}.0.0"
        return Reply(code, enhanced, self.text or "Next hop refused")

    def as_error(self) -> SMTPError:
        return SMTPError(self.as_reply())


def parse_reply_line(line: str) -> tuple[int, bool, str]:
    """C{"250-text"} -> (250, more lines follow, "text")."""
    if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
        raise ValueError(f"not an SMTP reply line: {line[:80]!r}")
    return int(line[:3]), line[3:4] == "-", line[4:]


def _split_enhanced(text: str) -> tuple[str, str]:
    match = _ENHANCED.match(text)
    if match is None:
        return "", text
    return ".".join(match.groups()), text[match.end() :]


class DownstreamError(Exception):
    """The next hop failed us; C{reply} is what the client is told (a 451)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def _unreachable(name: str, reason: str) -> DownstreamError:
    return DownstreamError(
        Reply(451, "4.4.1", f"Next hop {name} is unreachable: {reason}")
    )


def _lost(name: str) -> DownstreamError:
    return DownstreamError(
        Reply(451, "4.4.2", f"Connection to next hop {name} was lost")
    )


def _too_slow(name: str) -> DownstreamError:
    return DownstreamError(
        Reply(451, "4.4.2", f"Next hop {name} did not answer in time")
    )


def _tls_failed(name: str, reason: str) -> DownstreamError:
    return DownstreamError(
        Reply(451, "4.7.5", f"TLS with next hop {name} failed: {reason}")
    )


# -- the client protocol ------------------------------------------------------------
class DownstreamProtocol(LineReceiver):
    """A client connection that sends commands and matches replies in order.

    Every reply must come within C{timeout} seconds of the command (or of
    the previous reply); past it the connection is dropped and all waiting
    commands fail with L{DownstreamError} (451 4.4.2).
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 64 * 1024
    # a TCP or TLS transport
    transport: Any

    def __init__(self, name: str, timeout: float, clock: Any) -> None:
        self.name = name
        self.timeout = timeout
        self.clock = clock
        self.extensions: dict[str, str] = {}
        self.lost = False
        self.tls = False
        self.reused = 0
        self.discarded = False
        #: the borrower's callback for a connection lost while borrowed
        self.on_lost: Optional[Callable[[], None]] = None
        self._waiting: deque[Deferred[DownstreamReply]] = deque()
        self._lines: list[str] = []
        self._enhanced = ""
        self._code = 0
        self._timer: Any = None
        self._failure: Optional[DownstreamError] = None
        self.greeting: Deferred[DownstreamReply] = self._expect()

    # -- plumbing --
    def connectionMade(self) -> None:
        self._arm()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        self._disarm()
        error = self._failure
        if error is None:
            if reason is not None and reason.check(TLSError):
                error = _tls_failed(self.name, _tls_text(reason.value))
            else:
                error = _lost(self.name)
        self._fail_all(error)
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.abort(
            DownstreamError(
                Reply(451, "4.4.2", f"Next hop {self.name} sent an overlong line")
            )
        )

    def lineReceived(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace")
        try:
            code, more, text = parse_reply_line(line)
        except ValueError:
            self.abort(
                DownstreamError(
                    Reply(451, "4.4.2", f"Next hop {self.name} broke the protocol")
                )
            )
            return
        enhanced, text = _split_enhanced(text)
        if not self._lines:
            self._code, self._enhanced = code, enhanced
        self._lines.append(text)
        if more:
            return
        reply = DownstreamReply(self._code, self._enhanced, tuple(self._lines))
        self._lines = []
        if not self._waiting:
            # Unasked: a 421 before closing, say.  The connection is unusable.
            _log.info(
                "next hop {name} said unasked: {code} {text}",
                name=self.name,
                code=reply.code,
                text=reply.text,
            )
            self.abort(_lost(self.name))
            return
        waiter = self._waiting.popleft()
        self._disarm()
        if self._waiting:
            self._arm()
        if not waiter.called:
            waiter.callback(reply)

    # -- commands --
    def _expect(self) -> Deferred[DownstreamReply]:
        # Cancelling a command (a hook deadline) leaves its reply to come:
        # replies could no longer be matched, so the connection goes.
        waiter: Deferred[DownstreamReply] = Deferred(
            lambda _: self.abort(_too_slow(self.name))
        )
        if self.lost:
            waiter.errback(self._failure or _lost(self.name))
            return waiter
        self._waiting.append(waiter)
        self._arm()
        return waiter

    def command(self, line: str) -> Deferred[DownstreamReply]:
        """Send one command line; fires with its reply."""
        waiter = self._expect()
        if not self.lost:
            self.transport.write(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return waiter

    def expect(self) -> Deferred[DownstreamReply]:
        """One more reply to come (LMTP: one per recipient after DATA)."""
        return self._expect()

    def write(self, data: bytes) -> None:
        if not self.lost:
            self.transport.write(data)

    def abort(self, error: Optional[DownstreamError] = None) -> None:
        """Drop the connection now (a half-sent message is never completed)."""
        if self._failure is None:
            self._failure = error or _lost(self.name)
        if not self.lost and self.transport is not None:
            self.transport.abortConnection()
        else:
            self._fail_all(self._failure)

    def quit(self) -> None:
        """Say goodbye politely and close (idle connection leaving the pool)."""
        if self.lost or self._waiting:
            self.abort()
            return
        self.command("QUIT").addBoth(lambda _: self.transport.loseConnection())

    @property
    def idle(self) -> bool:
        return not self._waiting and not self.lost

    # -- the clock --
    def _arm(self) -> None:
        if self._timer is None and self._waiting:
            self._timer = self.clock.callLater(self.timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        _log.info("next hop {name} did not answer in time", name=self.name)
        self.abort(_too_slow(self.name))

    def _fail_all(self, error: DownstreamError) -> None:
        waiting, self._waiting = self._waiting, deque()
        for waiter in waiting:
            if not waiter.called:
                waiter.errback(Failure(error))


def _tls_text(error: Exception) -> str:
    parts = []
    for item in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        parts.append(item[-1] if isinstance(item, tuple) else str(item))
    return "; ".join(parts) or str(error) or "handshake failed"


# -- endpoints ----------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    """A target's client endpoint string split into what we need to know."""

    description: str  # for clientFromString, without our own keys
    host: Optional[str]  # None for unix sockets
    options: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.description

    @property
    def loopback(self) -> bool:
        if self.host is None:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_endpoint(
    scheme: str, target: str, our_keys: frozenset[str], reactor: Any
) -> Endpoint:
    """C{smtp:tcp:host:25:tls=none} -> the endpoint and C{{"tls": "none"}}.

    Raises ValueError with one sentence for anything unusable.
    """
    prefix = scheme + ":"
    if not target.lower().startswith(prefix) or len(target) == len(prefix):
        raise ValueError(
            f"--deliver {target!r}: expected {scheme}:ENDPOINT, e.g."
            f" {scheme}:tcp:host:port or {scheme}:unix:/path"
        )
    rest = target[len(prefix) :]
    parts = re.split(r"(?<!\\):", rest)
    kept, options = [], {}
    for part in parts:
        key, equals, value = part.partition("=")
        if equals and key.strip().lower() in our_keys:
            options[key.strip().lower()] = value
        else:
            kept.append(part)
    description = ":".join(kept)
    try:
        args, kwargs = _parse(description)
    except Exception:
        raise ValueError(f"--deliver {target!r}: bad endpoint {description!r}")
    kind = str(args[0]).lower() if args else ""
    if kind not in ("tcp", "unix"):
        raise ValueError(
            f"--deliver {target!r}: the endpoint must be tcp:HOST:PORT or unix:PATH"
        )
    try:
        clientFromString(reactor, description)
    except Exception as error:
        raise ValueError(f"--deliver {target!r}: bad endpoint: {error}")
    host: Optional[str] = None
    if kind == "tcp":
        host = str(kwargs.get("host") or (args[1] if len(args) > 1 else ""))
        if not host:
            raise ValueError(f"--deliver {target!r}: the endpoint names no host")
    return Endpoint(description, host, options)


# -- the pool -------------------------------------------------------------------------
class ConnectionPool:
    """At most C{size} connections to one next hop; idle ones are reused.

    Args:
        connect: opens and prepares a new connection (greeting, EHLO, TLS,
            AUTH), firing with a L{DownstreamProtocol}.
        size: connections at most; more borrowers wait (up to C{timeout}).
        idle_timeout: an idle connection is closed (QUIT) after this long.
    """

    def __init__(
        self,
        name: str,
        connect: Callable[[], Deferred[DownstreamProtocol]],
        clock: Any,
        size: int,
        timeout: float,
        idle_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self._connect = connect
        self._clock = clock
        self.size = size
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.open = 0  # connections counted against size (idle or borrowed)
        self._idle: list[tuple[DownstreamProtocol, Any]] = []
        self._waiters: deque[Deferred[DownstreamProtocol]] = deque()

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def acquire(self) -> Deferred[DownstreamProtocol]:
        """A connection ready for MAIL (C{reused} > 0 if it served before)."""
        while self._idle:
            connection, timer = self._idle.pop()
            if timer.active():
                timer.cancel()
            if connection.idle:
                connection.reused += 1
                return succeed(connection)
            connection.discarded = True
            self.open -= 1
        if self.open < self.size:
            return self._new()
        # Cancelled (its hook's deadline), a waiter leaves the queue: the
        # next connection given back must not go to it.
        waiter: Deferred[DownstreamProtocol] = Deferred(self._drop_waiter)
        timer = self._clock.callLater(self.timeout, self._wait_expired, waiter)
        waiter.addBoth(_cancel_timer, timer)
        self._waiters.append(waiter)
        return waiter

    def _drop_waiter(self, waiter: Deferred[DownstreamProtocol]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _new(self) -> Deferred[DownstreamProtocol]:
        self.open += 1

        def failed(failure: Failure) -> Failure:
            self.open -= 1
            self._serve_waiter()
            return failure

        return self._connect().addErrback(failed)

    def _wait_expired(self, waiter: Deferred[DownstreamProtocol]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            waiter.errback(
                DownstreamError(
                    Reply(
                        451,
                        "4.4.5",
                        f"All {self.size} connections to next hop {self.name} are busy",
                    )
                )
            )

    def release(self, connection: DownstreamProtocol) -> None:
        """Give back a connection at a transaction boundary."""
        connection.on_lost = None
        if connection.discarded:
            return
        if not connection.idle:
            self.discard(connection)
            return
        if self._waiters:
            connection.reused += 1
            self._waiters.popleft().callback(connection)
            return
        timer = self._clock.callLater(self.idle_timeout, self._expire, connection)
        self._idle.append((connection, timer))

    def discard(self, connection: DownstreamProtocol) -> None:
        """A broken or half-used connection: drop it, make room."""
        connection.on_lost = None
        connection.abort()
        if connection.discarded:
            return
        connection.discarded = True
        self.open -= 1
        self._serve_waiter()

    def _serve_waiter(self) -> None:
        if self._waiters and self.open < self.size:
            waiter = self._waiters.popleft()
            self._new().addBoth(self._hand_over, waiter)

    def _hand_over(
        self,
        result: Union[DownstreamProtocol, Failure],
        waiter: Deferred[DownstreamProtocol],
    ) -> None:
        """A new connection (or why not) for C{waiter}; if it was cancelled
        meanwhile, the connection goes back to the pool instead."""
        if isinstance(result, Failure):
            if not waiter.called:
                waiter.errback(result)
        elif waiter.called:
            self.release(result)  # to the next waiter, or idle
        else:
            waiter.callback(result)

    def _expire(self, connection: DownstreamProtocol) -> None:
        for i, (idle, _) in enumerate(self._idle):
            if idle is connection:
                del self._idle[i]
                connection.discarded = True
                self.open -= 1
                connection.quit()
                self._serve_waiter()
                return

    def close(self) -> None:
        """Close the idle connections (shutdown, tests)."""
        idle, self._idle = self._idle, []
        for connection, timer in idle:
            if timer.active():
                timer.cancel()
            connection.discarded = True
            self.open -= 1
            connection.quit()


def _cancel_timer(result: Any, timer: Any) -> Any:
    if timer.active():
        timer.cancel()
    return result


# -- the handler ---------------------------------------------------------------------
class _Transaction:
    """One client transaction and the downstream connection it borrowed.

    It holds the client's envelope, so the envelope's id, its key, can't be
    reused by another envelope while it is tracked.
    """

    __slots__ = (
        "connection",
        "accepted",
        "ended",
        "idle_timer",
        "session_id",
        "envelope",
    )

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self.session_id = envelope.session_id
        self.connection: Optional[DownstreamProtocol] = None
        self.accepted: list[str] = []
        self.ended = False
        self.idle_timer: Any = None


class ProxyHandler:
    """A handler that runs each client transaction beside one downstream.

    Subclasses say how to connect (L{connect}) and whether the downstream
    speaks LMTP (one reply per recipient after the data).

    A client transaction that ends without DATA (RSET, QUIT, a new EHLO,
    a lost connection) is told by the server's C{transaction_abandoned}
    hook: the downstream transaction is reset and its connection goes back
    to the pool at once.  Behind a wrapper that does not pass that hook on,
    the session's next MAIL, or else C{idle_timeout} seconds without a
    hook, does it instead.
    """

    lmtp = False
    #: RET, ENVID, NOTIFY and ORCPT go to the next hop (when it offers DSN)
    supports_dsn = True
    #: a borrowed connection is given back after this long without a hook
    idle_timeout = 330.0

    def __init__(
        self,
        endpoint: Endpoint,
        reactor: Any,
        timeout: float,
        pool_size: int = 16,
        helo: Optional[str] = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.endpoint = endpoint
        self.reactor = reactor
        self.timeout = timeout
        self.name = endpoint.name
        # Looked up once here: getfqdn() may block on DNS.
        self.helo = helo or socket.getfqdn() or "localhost"
        self.pool = ConnectionPool(self.name, self.connect, reactor, pool_size, timeout)
        self._transactions: dict[int, _Transaction] = {}
        self._by_session: dict[str, int] = {}
        self._resets: dict[str, Deferred[None]] = {}

    # -- connecting (subclasses extend) --
    def connect(self) -> Deferred[DownstreamProtocol]:
        """A new connection, greeted and ready for MAIL."""
        return Deferred.fromCoroutine(self._connect())

    async def _connect(self) -> DownstreamProtocol:
        endpoint = clientFromString(self.reactor, self.endpoint.description)
        factory = Factory.forProtocol(
            lambda: DownstreamProtocol(self.name, self.timeout, self.reactor)
        )
        attempt = endpoint.connect(factory)
        timer = self.reactor.callLater(self.timeout, attempt.cancel)
        try:
            connection: DownstreamProtocol = await attempt
        except Exception as error:
            reason = (
                "no connection in time"
                if isinstance(error, (CancelledError, TimeoutError))
                else _connect_text(error)
            )
            raise _unreachable(self.name, reason)
        finally:
            if timer.active():
                timer.cancel()
        try:
            await self.prepare(connection)
        except BaseException:
            connection.abort()
            raise
        return connection

    async def prepare(self, connection: DownstreamProtocol) -> None:
        """Greeting and LHLO/EHLO; the SMTP target adds TLS and AUTH."""
        self.start_tls_now(connection)
        greeting = await connection.greeting
        if greeting.code != 220:
            raise DownstreamError(
                Reply(
                    451,
                    "4.4.1",
                    f"Next hop {self.name} refused the connection:"
                    f" {greeting.code} {greeting.text}",
                )
            )
        await self.hello(connection)

    def start_tls_now(self, connection: DownstreamProtocol) -> None:
        """Implicit TLS hook (SMTP target)."""

    async def hello(self, connection: DownstreamProtocol) -> None:
        verb = "LHLO" if self.lmtp else "EHLO"
        reply = await connection.command(f"{verb} {self.hello_name()}")
        if not reply.ok and not self.lmtp:
            reply = await connection.command(f"HELO {self.hello_name()}")
            connection.extensions = {}
        if not reply.ok:
            raise DownstreamError(
                Reply(
                    451,
                    "4.4.1",
                    f"Next hop {self.name} refused {verb}: {reply.code} {reply.text}",
                )
            )
        extensions = {}
        for line in reply.lines[1:]:
            keyword, _, value = line.partition(" ")
            extensions[keyword.upper()] = value
        connection.extensions = extensions

    def hello_name(self) -> str:
        return self.helo

    # -- transactions --
    def _forget(self, key: int) -> Optional[_Transaction]:
        transaction = self._transactions.pop(key, None)
        if transaction is not None:
            if self._by_session.get(transaction.session_id) == key:
                del self._by_session[transaction.session_id]
            if transaction.idle_timer is not None and transaction.idle_timer.active():
                transaction.idle_timer.cancel()
            transaction.ended = True
        return transaction

    def transaction_abandoned(self, envelope: Envelope) -> Deferred[None]:
        """The client's transaction ended before DATA (the server's hook).

        Fires once the downstream transaction is reset and its connection
        back in the pool (or dropped if it broke).
        """
        return self._end_without_data(id(envelope))

    def _end_without_data(self, key: int) -> Deferred[None]:
        """The client's transaction ended before DATA: reset the downstream's."""
        transaction = self._forget(key)
        if transaction is None or transaction.connection is None:
            return succeed(None)
        connection, transaction.connection = transaction.connection, None
        if connection.lost:
            self.pool.discard(connection)
            return succeed(None)
        # The session's next MAIL waits for this, to reuse the connection.
        done: Deferred[None] = Deferred()
        session_id = transaction.session_id
        self._resets[session_id] = done

        def finished(_: Any) -> None:
            if self._resets.get(session_id) is done:
                del self._resets[session_id]
            done.callback(None)

        self.reset_and_release(connection).addBoth(finished)
        # The caller's own Deferred: the next MAIL waits on done as well.
        ended: Deferred[None] = Deferred()
        done.addCallback(lambda _: ended.callback(None))
        return ended

    def reset_and_release(self, connection: DownstreamProtocol) -> Deferred[None]:
        """RSET, then back to the pool (or dropped if RSET fails)."""

        def reset(reply: DownstreamReply) -> None:
            if reply.ok:
                self.pool.release(connection)
            else:
                self.pool.discard(connection)

        return connection.command("RSET").addCallbacks(
            reset, lambda _: self.pool.discard(connection)
        )

    def _touch(self, key: int, transaction: _Transaction) -> None:
        if transaction.idle_timer is not None and transaction.idle_timer.active():
            transaction.idle_timer.cancel()
        transaction.idle_timer = self.reactor.callLater(
            self.idle_timeout, self._end_without_data, key
        )

    def _transaction(self, envelope: Envelope) -> _Transaction:
        transaction = self._transactions.get(id(envelope))
        if transaction is None or transaction.connection is None:
            raise SMTPError(
                451, "4.4.2", f"Connection to next hop {self.name} was lost"
            )
        return transaction

    async def check_sender(self, envelope: Envelope) -> None:
        previous = self._by_session.get(envelope.session_id)
        if previous is not None:
            self._end_without_data(previous)
        resetting = self._resets.get(envelope.session_id)
        if resetting is not None:
            await resetting
        key = id(envelope)
        transaction = _Transaction(envelope)
        self._transactions[key] = transaction
        self._by_session[envelope.session_id] = key
        self._touch(key, transaction)
        try:
            connection = await self._mail(envelope)
        except BaseException:
            self._forget(key)
            raise
        if transaction.ended:  # the client gave up meanwhile
            self.reset_and_release(connection)
            return
        transaction.connection = connection
        connection.on_lost = lambda: self._lost(key, connection)

    async def _mail(self, envelope: Envelope) -> DownstreamProtocol:
        """Borrow a connection and send MAIL; a reused one that died idle is
        replaced once."""
        for attempt in (1, 2):
            try:
                connection = await self.pool.acquire()
            except DownstreamError as error:
                raise SMTPError(error.reply)
            try:
                line = self.mail_line(envelope, connection.extensions)
            except SMTPError:
                self.pool.release(connection)
                raise
            try:
                reply = await connection.command(line)
            except DownstreamError as error:
                self.pool.discard(connection)
                if connection.reused and attempt == 1:
                    continue
                raise SMTPError(error.reply)
            except BaseException:
                # Cancelled (the hook's deadline): the command's canceller
                # dropped the connection; it leaves the pool's count too.
                self.pool.discard(connection)
                raise
            if not reply.ok:
                self.pool.release(connection)
                raise reply.as_error()
            return connection
        raise AssertionError("unreachable")

    def _lost(self, key: int, connection: DownstreamProtocol) -> None:
        transaction = self._transactions.get(key)
        if transaction is not None and transaction.connection is connection:
            transaction.connection = None
        self.pool.discard(connection)

    async def check_recipient(
        self, envelope: Envelope, address: str, options: dict[str, Optional[str]]
    ) -> None:
        transaction = self._transaction(envelope)
        connection = transaction.connection
        assert connection is not None
        self._touch(id(envelope), transaction)
        line = f"RCPT TO:<{address}>" + self.rcpt_parameters(
            options, connection.extensions
        )
        try:
            reply = await connection.command(line)
        except DownstreamError as error:
            raise SMTPError(error.reply)
        if not reply.ok:
            raise reply.as_error()
        transaction.accepted.append(address)

    def open_message(self, envelope: Envelope) -> _ProxyReceiver:
        key = id(envelope)
        transaction = self._forget(key)
        connection = transaction.connection if transaction is not None else None
        if transaction is not None:
            transaction.connection = None
        prefix = envelope.received_header
        receiver = _ProxyReceiver(
            self,
            connection,
            list(transaction.accepted) if transaction is not None else [],
            prefix,
        )
        # An LMTP client gets the next hop's reply per recipient.
        receiver.client_lmtp = envelope.lmtp
        return receiver

    # -- parameters --
    def mail_line(self, envelope: Envelope, extensions: dict[str, str]) -> str:
        """MAIL FROM with the parameters the next hop understands."""
        params = []
        options = envelope.mail_options
        if "SMTPUTF8" in options:
            if "SMTPUTF8" not in extensions:
                raise SMTPError(
                    550,
                    "5.6.7",
                    f"Next hop {self.name} does not support SMTPUTF8",
                )
            params.append("SMTPUTF8")
        body = options.get("BODY")
        if body and body.upper() == "8BITMIME" and "8BITMIME" in extensions:
            params.append("BODY=8BITMIME")
        size = options.get("SIZE")
        if size and "SIZE" in extensions:
            params.append(f"SIZE={size}")
        if "DSN" in extensions:
            for name in ("RET", "ENVID"):
                value = options.get(name)
                if value:
                    params.append(f"{name}={value}")
        return f"MAIL FROM:<{envelope.mail_from}>" + "".join(" " + p for p in params)

    def rcpt_parameters(
        self, options: dict[str, Optional[str]], extensions: dict[str, str]
    ) -> str:
        if "DSN" not in extensions:
            return ""
        params = []
        for name in ("NOTIFY", "ORCPT"):
            value = options.get(name)
            if value:
                params.append(f"{name}={value}")
        return "".join(" " + p for p in params)


def _as_final(reply: DownstreamReply) -> Reply:
    if reply.ok:
        enhanced = reply.enhanced if reply.enhanced[:1] == "2" else "2.0.0"
        return Reply(250, enhanced, reply.text or "Ok")
    return reply.as_reply()


def combine_lmtp_replies(
    name: str, recipients: list[str], replies: list[DownstreamReply]
) -> Optional[str]:
    """One SMTP answer for LMTP's per-recipient replies.

    - every recipient 2xx: 250;
    - nobody has it: 451 if any reply was temporary (the client retries, no
      one gets it twice), else the first 5xx;
    - some have it, some do not: no answer is both complete and free of
      duplicates.  If any failure is temporary: 451 (at-least-once: the
      client's retry may give a recipient that has it a second copy);
      if every failure is permanent: 554 5.5.0 whose text lists who got it,
      so the sender's bounce tells the truth and nobody gets it twice.
    """
    delivered = [r for r, reply in zip(recipients, replies) if reply.ok]
    failed = [(r, reply) for r, reply in zip(recipients, replies) if not reply.ok]
    if not failed:
        return None
    temporary = [(r, reply) for r, reply in failed if reply.code < 500]
    detail = "; ".join(
        f"<{r}>: {reply.code} {reply.enhanced} {reply.text}".replace("  ", " ")
        for r, reply in failed
    )
    if not delivered:
        if temporary:
            first = temporary[0][1]
            enhanced = first.enhanced if first.enhanced[:1] == "4" else "4.0.0"
            raise SMTPError(451, enhanced, first.text or "Try again later")
        raise failed[0][1].as_error()
    got = ", ".join(f"<{r}>" for r in delivered)
    if temporary:
        raise SMTPError(
            451,
            "4.5.0",
            f"Next hop {name} delivered to {got} only; not yet: {detail}",
        )
    raise SMTPError(
        554, "5.5.0", f"Next hop {name} delivered to {got} only; failed: {detail}"
    )


class _PausingProxy:
    """The client connection as the downstream transport's producer.

    The downstream's full write buffer pauses the client; a pause longer
    than the deliver timeout gives up on the downstream.  C{stopProducing}
    (the downstream went away) must not close the client: it gets a 451.
    """

    def __init__(self, receiver: _ProxyReceiver, producer: Any) -> None:
        self._receiver = receiver
        self._producer = producer
        self._timer: Any = None
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        self._producer.pauseProducing()
        if self._timer is None:
            handler = self._receiver.handler
            self._timer = handler.reactor.callLater(
                handler.timeout, self._receiver.stalled
            )

    def resumeProducing(self) -> None:
        self.paused = False
        self.cancel_timer()
        self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self.cancel_timer()
        if self.paused:
            self.paused = False
            self._producer.resumeProducing()

    def cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None


class _ProxyReceiver:
    """Streams one message into the downstream's DATA."""

    def __init__(
        self,
        handler: ProxyHandler,
        connection: Optional[DownstreamProtocol],
        recipients: list[str],
        prefix: bytes,
    ) -> None:
        self.handler = handler
        self._connection = connection
        self._recipients = recipients
        self._error: Optional[Reply] = None
        self._early: Optional[list[bytes]] = []  # before the 354
        self._early_size = 0
        self._tail = b"\r\n"  # the last two bytes sent (stuffing, final CRLF)
        self._pending_cr = False  # a chunk ended in CR: is it CRLF?
        self._producer: Any = None
        self._proxy: Optional[_PausingProxy] = None
        self._early_paused = False
        self._registered = False
        self._done = False
        self.client_lmtp = False
        if connection is None:
            self._error = Reply(
                451, "4.4.2", f"Connection to next hop {handler.name} was lost"
            )
            self._go_ahead: Deferred[Any] = succeed(None)
            return
        connection.on_lost = self._connection_lost
        self._go_ahead = connection.command("DATA")
        self._go_ahead.addCallbacks(self._data_answered, self._data_failed)
        self._pending_prefix = prefix

    # -- IConsumer, as the protocol sees us --
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer
        if self._connection is not None and not self._connection.lost:
            self._proxy = _PausingProxy(self, producer)
            if self._early is None:
                self._register()

    def unregisterProducer(self) -> None:
        self._release_producer()
        self._producer = None

    def _release_producer(self) -> None:
        if self._early_paused and self._producer is not None:
            self._early_paused = False
            self._producer.resumeProducing()
        if self._proxy is not None:
            self._proxy.cancel_timer()
            proxy, self._proxy = self._proxy, None
            connection = self._connection
            if self._registered and connection is not None and not connection.lost:
                connection.transport.unregisterProducer()
            self._registered = False
            if proxy.paused:
                proxy.paused = False
                self._producer.resumeProducing()

    # -- downstream events --
    def _data_answered(self, reply: DownstreamReply) -> None:
        if self._done:
            return
        if reply.code != 354:
            self._error = reply.as_reply()
            # Nothing of the body was sent: the connection is still usable
            # once its transaction is reset.
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.on_lost = None
                self.handler.reset_and_release(connection)
            self._early = None
            self._release_producer()
            return
        early, self._early = self._early, None
        self._send(self._pending_prefix)
        for chunk in early or ():
            self._send(chunk)
        if self._early_paused and self._producer is not None:
            self._early_paused = False
            self._producer.resumeProducing()
        self._register()

    def _register(self) -> None:
        connection = self._connection
        if self._proxy is not None and connection is not None and not connection.lost:
            connection.transport.registerProducer(self._proxy, True)
            self._registered = True

    def _data_failed(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, DownstreamError):
            self._fail(error.reply)
        else:
            self._fail(Reply(451, "4.4.2", f"Next hop {self.handler.name} failed"))

    def _connection_lost(self) -> None:
        if self._connection is not None and not self._done:
            self._fail(
                Reply(
                    451,
                    "4.4.2",
                    f"Connection to next hop {self.handler.name} was lost",
                )
            )

    def stalled(self) -> None:
        """The downstream stopped reading for longer than the timeout."""
        self._fail(Reply(451, "4.4.2", f"Next hop {self.handler.name} stopped reading"))

    def _fail(self, reply: Reply) -> None:
        if self._error is None:
            self._error = reply
        self._early = None
        self._release_producer()
        connection, self._connection = self._connection, None
        if connection is not None:
            self.handler.pool.discard(connection)

    # -- the body --
    def _send(self, data: bytes) -> None:
        """Normalise line ends, dot-stuff, send.

        A bare CR or LF becomes CRLF: a next hop that ends lines on a bare
        LF must not see a line our DATA reader did not (SMTP smuggling),
        and RFC 5321 allows no other line end anyway.
        """
        if not data or self._connection is None:
            return
        if self._pending_cr:
            self._pending_cr = False
            data = b"\r" + data
        if data.endswith(b"\r"):
            self._pending_cr = True
            data = data[:-1]
            if not data:
                return
        if b"\r" in data or b"\n" in data:
            data = _LINE_END.sub(b"\r\n", data)
        tail = self._tail
        stuffed = (tail + data).replace(b"\r\n.", b"\r\n..")[len(tail) :]
        self._tail = (tail + data)[-2:]
        self._connection.write(stuffed)

    def write(self, data: bytes) -> None:
        if self._error is not None or self._done:
            return
        if self._early is not None:
            self._early.append(data)
            self._early_size += len(data)
            if (
                self._early_size > _MAX_EARLY_BODY
                and self._producer is not None
                and not self._early_paused
            ):
                self._early_paused = True
                self._producer.pauseProducing()
            return
        self._send(data)

    async def _replies(self) -> list[DownstreamReply]:
        """End the data; the next hop's final replies, one per recipient
        (raises SMTPError when the message as a whole failed)."""
        try:
            await self._go_ahead
        except DownstreamError:
            pass
        if self._error is not None:
            raise SMTPError(self._error)
        connection = self._connection
        assert connection is not None
        self._done = True
        self._release_producer()
        if self._pending_cr:
            self._pending_cr = False
            connection.write(b"\r\n")
            self._tail = b"\r\n"
        # The data must end with CRLF before the dot (BDAT data may not).
        ending = b".\r\n" if self._tail == b"\r\n" else b"\r\n.\r\n"
        waits = [connection.expect()]
        if self.handler.lmtp:
            waits += [connection.expect() for _ in self._recipients[1:]]
        connection.write(ending)
        replies = []
        try:
            for waiting in waits:
                replies.append(await waiting)
        except DownstreamError as error:
            for waiting in waits[len(replies) + 1 :]:
                waiting.addErrback(lambda _: None)
            self._connection = None
            self.handler.pool.discard(connection)
            if replies and self.handler.lmtp:
                _log.warn(
                    "next hop {name} lost after {n} of {total} LMTP replies",
                    name=self.handler.name,
                    n=len(replies),
                    total=len(self._recipients),
                )
                # Those recipients' replies are known; the rest are not.
                lost = DownstreamReply(451, "4.4.2", (error.reply.text,))
                replies += [lost] * (len(self._recipients) - len(replies))
                return replies
            raise SMTPError(error.reply)
        self._connection = None
        self.handler.pool.release(connection)
        if not self.handler.lmtp:
            replies = replies * len(self._recipients)
        return replies

    async def _finish(self) -> Any:
        replies = await self._replies()
        if self.client_lmtp:
            # RFC 2033: our LMTP client gets each recipient's own outcome.
            return {
                recipient: None if reply.ok else reply.as_error()
                for recipient, reply in zip(self._recipients, replies)
            }
        if self.handler.lmtp:
            return combine_lmtp_replies(self.handler.name, self._recipients, replies)
        if not replies[0].ok:
            raise replies[0].as_error()
        return None

    def finish(self) -> Deferred[Any]:
        """The client's one answer: 250 only if every recipient has it; for an
        LMTP client, a mapping of each recipient to None (stored) or its
        SMTPError."""
        return Deferred.fromCoroutine(self._finish())

    async def _finish_each(self) -> list[tuple[str, Reply]]:
        replies = await self._replies()
        return [
            (recipient, _as_final(reply))
            for recipient, reply in zip(self._recipients, replies)
        ]

    def finish_each(self) -> Deferred[list[tuple[str, Reply]]]:
        """Per recipient, in RCPT order: (address, the next hop's reply).

        For a server answering LMTP (RFC 2033 4.2: one reply per recipient
        after the data) instead of L{finish}'s single answer.  Raises
        SMTPError when the message failed as a whole.
        """
        return Deferred.fromCoroutine(self._finish_each())

    def abort(self) -> None:
        """Never send the final dot: the downstream drops what it got."""
        self._done = True
        self._early = None
        self._release_producer()
        connection, self._connection = self._connection, None
        if connection is not None:
            self.handler.pool.discard(connection)


def _connect_text(error: Exception) -> str:
    if isinstance(error, net_error.ConnectionRefusedError):
        return "connection refused"
    text = str(error).strip()
    return text.rstrip(".") or type(error).__name__


def auth_plain(user: str, password: str) -> str:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
    return f"AUTH PLAIN {token}"
