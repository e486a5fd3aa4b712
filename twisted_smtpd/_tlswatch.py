# -*- test-case-name: tests.test_connection_hardening -*-
"""
A connection's TLS as the protocol sees it: the facts of the link, and a
watch over its handshake.

A L{TLSWatch} exists only on connections that use TLS (an C{ssl:} listener,
or after STARTTLS): plain sessions pay nothing for it.  It owns the
handshake's deadline, records the facts in the session when the handshake
completes, and turns a failed handshake into one log line and an event.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from OpenSSL.SSL import Error as TLSError
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._session import Session, TLSInfo

__all__ = ["TLSWatch", "current_tls", "tls_error_text"]

_log = Logger(namespace="twisted_smtpd.protocol")


def current_tls(transport: Any) -> TLSInfo:
    """Protocol, cipher and client certificate of C{transport}'s TLS, if any."""
    connection = None
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is not None:
        try:
            connection = get_handle()
        except Exception:
            connection = None
    if connection is None or not hasattr(connection, "get_cipher_name"):
        return TLSInfo("", "")
    return TLSInfo(
        protocol=connection.get_protocol_version_name() or "",
        cipher=connection.get_cipher_name() or "",
        peer_certificate=connection.get_peer_certificate(as_cryptography=True),
    )


def tls_error_text(error: Exception) -> str:
    """OpenSSL's error list as one short line."""
    parts = []
    for item in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        parts.append(item[-1] if isinstance(item, tuple) else str(item))
    return "; ".join(parts) or repr(error)


class TLSWatch:
    """The TLS handshakes of one connection.

    Args:
        transport: the connection's transport.
        session: its session (C{session.tls} gets the facts).
        events: the factory's L{SessionEvents}, or None.
    """

    __slots__ = ("_transport", "_session", "_events", "_deadline")

    def __init__(self, transport: Any, session: Session, events: Any) -> None:
        self._transport = transport
        self._session = session
        self._events = events
        self._deadline: Any = None

    def expect(self, reactor: Any, timeout: float, expired: Callable[[], None]) -> None:
        """A handshake has begun: C{expired()} if it is not done in C{timeout}."""
        if timeout and self._deadline is None:
            self._deadline = reactor.callLater(timeout, self._check, expired)

    def _check(self, expired: Callable[[], None]) -> None:
        self._deadline = None
        if current_tls(self._transport).cipher:
            return  # done, and the callback did not reach us
        _log.info(
            "smtpd session {session_id}: TLS handshake timeout",
            session_id=self._session.session_id,
        )
        if self._events is not None:
            self._events.tls_handshake(False)
        expired()

    def completed(self) -> None:
        """The handshake is done: record its facts."""
        self.cancel()
        if self._session.tls is not None:
            self._session.tls = current_tls(self._transport)
        if self._events is not None:
            self._events.tls_handshake(True)

    def lost(self, reason: Optional[Failure]) -> None:
        """The connection is gone: a failed handshake is one log line."""
        self.cancel()
        if reason is not None and reason.check(TLSError):
            if self._events is not None:
                self._events.tls_handshake(False)
            _log.info(
                "smtpd session {session_id}: TLS failed: {error}",
                session_id=self._session.session_id,
                error=tls_error_text(reason.value),
            )

    def cancel(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()
