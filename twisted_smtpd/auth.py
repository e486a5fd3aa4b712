# -*- test-case-name: tests.test_auth -*-
"""
SMTP AUTH (RFC 4954): SASL PLAIN, LOGIN and CRAM-MD5 over C{twisted.cred}.

A mechanism is a generator that turns the AUTH line and the client's
continuation lines into C{twisted.cred} credentials; the portal checks them,
and the avatar becomes C{envelope.auth}.  L{AuthPolicy} starts an exchange
and judges the credentials; L{AuthExchange} runs one for the protocol: the
client's answers as an input mode, the check while input is held, and the
delay before each C{535} (cancelled with the connection).
"""

from __future__ import annotations

import binascii
import os
import time
from base64 import b64decode, b64encode
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.cred import credentials as cred_credentials
from twisted.cred.checkers import (
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from ._input import LineMode
from ._peer import peer_host
from .replies import (
    R235_AUTH_OK,
    R334_CHALLENGE,
    R421_AUTH_FAILURES,
    R454_AUTH_RATE_LIMITED,
    R454_AUTH_TEMPORARY,
    R500_AUTH_LINE_TOO_LONG,
    R501_AUTH_BASE64,
    R501_AUTH_CANCELLED,
    R501_SYNTAX_AUTH,
    R503_ALREADY_AUTH,
    R504_UNKNOWN_MECHANISM,
    R535_AUTH_FAILED,
    R538_AUTH_NEEDS_TLS,
    Reply,
    SMTPError,
    fill,
)

if TYPE_CHECKING:
    from ._session import Session
    from .protocol import SMTPServerProtocol

__all__ = ["AuthPolicy", "AuthExchange", "IAuthenticatedSender", "MECHANISMS"]

_log = Logger()
# The exchange's lines are the session's: logged where the protocol logs.
_session_log = Logger(namespace="twisted_smtpd.protocol")


class IAuthenticatedSender(Interface):
    """The avatar interface asked of the realm; the avatar is C{envelope.auth}."""


@implementer(IRealm)
class IdentityRealm:
    """The default realm: the avatar is the authenticated user name (str)."""

    def requestAvatar(
        self, avatarId: Any, mind: Any, *interfaces: Any
    ) -> tuple[Any, Any, Callable[[], None]]:
        if isinstance(avatarId, bytes):
            avatarId = avatarId.decode("utf-8", "replace")
        return IAuthenticatedSender, avatarId, lambda: None


class _Cancelled(Exception):
    pass


def _decode(line: str) -> bytes:
    """A client's base64 response; C{*} cancels; C{=} is an empty response."""
    if line == "*":
        raise _Cancelled()
    if line == "=":
        return b""
    try:
        return b64decode(line.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise SMTPError(R501_AUTH_BASE64) from None


def _challenge(data: bytes) -> Reply:
    return fill(R334_CHALLENGE, challenge=b64encode(data).decode("ascii"))


def _plain(initial: Optional[str], **_: Any) -> Any:
    response = _decode(initial) if initial is not None else None
    if response is None:
        response = _decode((yield _challenge(b"")))
    parts = response.split(b"\0")
    if len(parts) != 3 or not parts[1]:
        raise SMTPError(R501_AUTH_BASE64.with_text("Malformed PLAIN response"))
    authzid, username, password = parts
    if authzid and authzid != username:
        # Acting for another user is not supported.
        yield None
        return
    yield cred_credentials.UsernamePassword(username, password)


def _login(initial: Optional[str], **_: Any) -> Any:
    if initial is not None:
        username = _decode(initial)
    else:
        username = _decode((yield _challenge(b"Username:")))
    password = _decode((yield _challenge(b"Password:")))
    yield cred_credentials.UsernamePassword(username, password)


def _cram_md5(initial: Optional[str], *, hostname: str = "localhost") -> Any:
    if initial is not None:
        raise SMTPError(R501_SYNTAX_AUTH)
    credentials = cred_credentials.CramMD5Credentials(hostname.encode("idna"))
    credentials.challenge = (
        f"<{int.from_bytes(os.urandom(8), 'big')}.{int(time.time())}@{hostname}>"
    ).encode("ascii")
    response = _decode((yield _challenge(credentials.challenge)))
    username, _, digest = response.rpartition(b" ")
    if not username or len(digest) != 32:
        yield None
        return
    credentials.username = username  # type: ignore[assignment]
    credentials.response = digest.lower()
    yield credentials


#: mechanism name -> (exchange, credentials interface it needs)
MECHANISMS: dict[str, tuple[Callable[..., Any], Any]] = {
    "PLAIN": (_plain, cred_credentials.IUsernamePassword),
    "LOGIN": (_login, cred_credentials.IUsernamePassword),
    "CRAM-MD5": (_cram_md5, cred_credentials.IUsernameHashedPassword),
}


def _bytes_users(checker: Any) -> Any:
    """strcred's memory checker keeps str; SASL credentials are bytes."""
    if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
        checker.users = {
            (k.encode() if isinstance(k, str) else k): (
                v.encode() if isinstance(v, str) else v
            )
            for k, v in checker.users.items()
        }
    return checker


class AuthPolicy:
    """Who may AUTH, how, and what happens on failure.

    Args:
        portal: a C{twisted.cred} portal; its realm is asked for
            L{IAuthenticatedSender} and the avatar becomes C{envelope.auth}.
        mechanisms: offered mechanisms in order; those the portal's checkers
            cannot verify (CRAM-MD5 needs C{IUsernameHashedPassword}) are
            dropped.
        required: refuse MAIL before AUTH (530 5.7.0).
        allow_without_tls: offer AUTH on connections without TLS.
        max_failures: failed attempts before 421 and close.
        failure_delay: seconds to wait before each 535, times the attempt.
    """

    def __init__(
        self,
        portal: Portal,
        *,
        mechanisms: Sequence[str] = ("PLAIN", "LOGIN", "CRAM-MD5"),
        required: bool = False,
        allow_without_tls: bool = False,
        max_failures: int = 5,
        failure_delay: float = 1.0,
    ) -> None:
        supported = set(portal.listCredentialsInterfaces())
        unknown = [m for m in mechanisms if m.upper() not in MECHANISMS]
        if unknown:
            raise ValueError(f"unknown SASL mechanisms: {', '.join(unknown)}")
        self.portal = portal
        self.mechanisms = [
            m.upper() for m in mechanisms if MECHANISMS[m.upper()][1] in supported
        ]
        self.required = required
        self.allow_without_tls = allow_without_tls
        self.max_failures = max_failures
        self.failure_delay = failure_delay

    @classmethod
    def from_checkers(
        cls, checkers: Iterable[ICredentialsChecker], **kwargs: Any
    ) -> AuthPolicy:
        """A policy over a portal with the default realm and these checkers."""
        portal = Portal(IdentityRealm(), [_bytes_users(c) for c in checkers])
        return cls(portal, **kwargs)

    def available(self, session: Session) -> bool:
        return session.tls is not None or self.allow_without_tls

    def advertised(self, session: Session) -> list[str]:
        return self.mechanisms if self.available(session) else []

    # -- the exchange ------------------------------------------------------------
    # The protocol runs the exchange (it owns the input mode and the failure
    # delay); the policy only starts it and judges the credentials.
    def start(self, session: Session, argument: str, hostname: str) -> Any:
        """C{AUTH mechanism [initial-response]}: the exchange to run.

        The exchange is a generator: L{step} it with C{None} first, then with
        each line the client answers a challenge with.

        Raises:
            SMTPError: the AUTH command itself is refused.
        """
        if session.auth is not None:
            raise SMTPError(R503_ALREADY_AUTH)
        name, _, initial = argument.partition(" ")
        name = name.upper()
        if not name or " " in initial.strip():
            raise SMTPError(R501_SYNTAX_AUTH)
        if name not in self.mechanisms:
            raise SMTPError(R504_UNKNOWN_MECHANISM)
        if not self.available(session):
            raise SMTPError(R538_AUTH_NEEDS_TLS)
        return MECHANISMS[name][0](initial.strip() or None, hostname=hostname)

    @staticmethod
    def step(exchange: Any, answer: Optional[str]) -> Any:
        """Advance C{exchange}: a challenge L{Reply}, credentials, or None.

        None means the answer can't be valid credentials (a failed attempt).

        Raises:
            SMTPError: the exchange ends with this reply (cancelled, bad
                base64, malformed response).
        """
        try:
            return next(exchange) if answer is None else exchange.send(answer)
        except _Cancelled:
            raise SMTPError(R501_AUTH_CANCELLED) from None

    def login(self, credentials: Any) -> Deferred[Any]:
        """Check C{credentials}: fires with the avatar (C{envelope.auth})."""
        login: Deferred[Any] = self.portal.login(
            credentials, None, IAuthenticatedSender
        )
        return login.addCallback(lambda result: result[1])

    @staticmethod
    def error_reply(failure: Failure, session_id: str) -> Optional[Reply]:
        """None for wrong credentials; the 454 (logged) for a checker fault."""
        if failure.check(UnauthorizedLogin, LoginFailed):
            return None
        _log.failure(
            "smtpd session {session_id}: credentials check failed",
            failure,
            session_id=session_id,
        )
        return R454_AUTH_TEMPORARY


class AuthExchange:
    """One AUTH command, run for the protocol from start to 235 or 535.

    The client's answers to the challenges are read as their own input mode
    (a line mode bounded by C{max_auth_line}, never logged); the credentials
    check and the delay before a 535 hold the input behind them.  The
    delay is the protocol's pending wait, so C{connectionLost} cancels it.

    Args:
        protocol: the session's protocol.
        policy: the factory's L{AuthPolicy}.
    """

    __slots__ = ("_protocol", "_policy", "_sasl")

    def __init__(self, protocol: SMTPServerProtocol, policy: AuthPolicy) -> None:
        self._protocol = protocol
        self._policy = policy
        self._sasl: Any = None

    def start(self, argument: str) -> None:
        """C{AUTH argument}.

        Raises:
            SMTPError: the AUTH command itself is refused.
        """
        protocol = self._protocol
        factory = protocol.factory
        limiter = factory.auth_limiter
        if limiter is not None and limiter.blocked(
            peer_host(protocol.session.peer) or ""
        ):
            self._ended(False)
            protocol.reply(R454_AUTH_RATE_LIMITED)
            return
        self._sasl = self._policy.start(protocol.session, argument, factory.hostname)
        self._step(None)

    def _step(self, answer: Optional[str]) -> None:
        protocol = self._protocol
        try:
            result = self._policy.step(self._sasl, answer)
        except SMTPError as error:
            protocol._set_mode(protocol._lines)
            self._ended(False)
            protocol.reply(error.reply)
            return
        if isinstance(result, Reply):  # a challenge: the answer is a SASL line
            if protocol._mode is protocol._lines:
                limit = protocol.limits.max_auth_line - 2
                mode = LineMode(protocol, self._answered, self._too_long, limit)
                protocol._set_mode(mode)
            protocol.reply(result)
            return
        protocol._set_mode(protocol._lines)
        if result is None:
            self._failed(None)
            return
        login = self._policy.login(result)
        protocol._hold(login)
        login.addCallbacks(
            protocol._complete,
            protocol._complete,
            (self._authenticated,),
            errbackArgs=(self._failed,),
        )
        login.addErrback(protocol._unexpected)

    def _answered(self, protocol: SMTPServerProtocol, line: bytes) -> None:
        """A client's answer to a challenge (never logged)."""
        if protocol._debug:
            _session_log.info(
                "smtpd {session_id} <<< ****", session_id=protocol.session.session_id
            )
        self._step(line.decode("ascii", "replace").strip())

    def _too_long(self, protocol: SMTPServerProtocol, line: bytes) -> None:
        protocol._set_mode(protocol._lines)
        self._ended(False)
        protocol.reply(R500_AUTH_LINE_TOO_LONG)

    def _authenticated(self, avatar: Any) -> None:
        session = self._protocol.session
        session.authenticated(avatar)
        _session_log.info(
            "smtpd session {session_id} authenticated as {identity}",
            session_id=session.session_id,
            identity=avatar,
        )
        self._ended(True)
        self._protocol.reply(R235_AUTH_OK)

    def _failed(self, failure: Optional[Failure]) -> None:
        protocol = self._protocol
        session = protocol.session
        if failure is not None:
            reply = self._policy.error_reply(failure, session.session_id)
            if reply is not None:
                self._ended(False)
                protocol.reply(reply)
                return
        session.auth_failures += 1
        _session_log.info(
            "smtpd session {session_id}: authentication failed ({count})",
            session_id=session.session_id,
            count=session.auth_failures,
        )
        limiter = protocol.factory.auth_limiter
        host = peer_host(session.peer)
        if limiter is not None and host is not None and limiter.failed(host):
            _session_log.warn(
                "smtpd: {host} reached the AUTH failure limit ({limit}):"
                " AUTH refused for {window:g} s",
                host=host,
                limit=limiter.describe(),
                window=limiter.window,
            )
        delay = self._policy.failure_delay * session.auth_failures
        if delay > 0:
            call = protocol.factory.reactor.callLater(
                delay, protocol._complete, None, self._refused
            )
            protocol._hold(call)
        else:
            self._refused(None)

    def _refused(self, _: Any) -> None:
        protocol = self._protocol
        self._ended(False)
        protocol.reply(R535_AUTH_FAILED)
        if protocol.session.auth_failures >= self._policy.max_failures:
            hostname = protocol.factory.hostname
            protocol.close_with(fill(R421_AUTH_FAILURES, hostname=hostname))

    def _ended(self, ok: bool) -> None:
        events = self._protocol._events
        if events is not None:
            events.auth_attempt(ok)
