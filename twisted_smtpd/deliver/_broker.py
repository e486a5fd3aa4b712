# -*- test-case-name: tests.test_deliver_broker -*-
"""
What the broker targets (AMQP, Redis Streams, NATS JetStream) share.

A broker target is a L{BrokerHandler} around an engine-specific
L{Publisher}.  The handler takes the whole message (bounded by the server's
C{--max-message-size} and the engine's own limit), gives it a
L{new_message_id}, and answers C{250 ... queued as <id>} only once the
publisher's Deferred fires, which each engine fires on its acknowledgement
(publisher confirm, XADD reply, JetStream publish ack).  Without a spool an
engine that is down, refuses or is too slow gives C{451}; with one
(L{twisted_smtpd.deliver.spool}) the message is fsynced locally instead,
answered 250, and forwarded later with the same id.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..replies import SMTPError

if TYPE_CHECKING:
    from .._session import Envelope
    from .spool import Spool

__all__ = [
    "BrokerHandler",
    "EngineRefused",
    "EngineUnavailable",
    "OutboundMessage",
    "Publisher",
    "new_message_id",
    "with_timeout",
]

_log = Logger()

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_message_id(now: Optional[float] = None) -> str:
    """A 26-character id unique across instances and restarts.

    The shape is a ULID: Crockford base32 of 48 bits of Unix time in
    milliseconds followed by 80 random bits from C{os.urandom}.  Nothing
    about the process goes into it, so two instances, or one instance before
    and after a restart, cannot collide short of 2**40 ids in the same
    millisecond; ids sort by time to the millisecond.
    """
    millis = int((time.time() if now is None else now) * 1000) & (2**48 - 1)
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class EngineUnavailable(Exception):
    """The engine cannot take messages now: down, (re)connecting, the
    channel closed, or no answer within the timeout."""


class EngineRefused(Exception):
    """The engine answered but did not take the message (a nack, or an
    unroutable message)."""


def _text(value: Any) -> str:
    # Envelope strings may carry surrogate escapes of non-UTF-8 bytes; every
    # engine wants valid UTF-8.
    return str(value).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass(frozen=True)
class OutboundMessage:
    """One message as every engine publishes it.

    C{envelope} is a flat JSON-able dict (strings, a list of recipients,
    numbers, C{None}); C{body} is the message with our C{Received:} header
    first, CRLF line endings.
    """

    message_id: str
    envelope: dict[str, Any]
    body: bytes = field(repr=False)

    @classmethod
    def from_envelope(cls, envelope: Envelope) -> OutboundMessage:
        message_id = new_message_id()
        tls = envelope.tls
        fields: dict[str, Any] = {
            "id": message_id,
            "mail_from": _text(envelope.mail_from),
            "rcpt_to": [_text(r) for r in envelope.rcpt_tos],
            "peer": _text(getattr(envelope.peer, "host", envelope.peer)),
            "helo": _text(envelope.helo),
            "session": envelope.session_id,
            "received_at": int(envelope.received_at or time.time()),
            "size": envelope.size,
            "tls": f"{tls.protocol} {tls.cipher}" if tls is not None else None,
            "auth": _text(envelope.auth) if envelope.auth is not None else None,
        }
        return cls(message_id, fields, envelope.received_header + envelope.content)

    def string_fields(self) -> dict[str, str]:
        """The envelope as strings (lists as JSON, C{None} left out), for
        engines whose headers or fields are flat strings."""
        out = {}
        for key, value in self.envelope.items():
            if value is None:
                continue
            out[key] = json.dumps(value) if isinstance(value, list) else str(value)
        return out

    def to_bytes(self) -> bytes:
        """The spool file's content: one JSON line, then the body."""
        head = {"id": self.message_id, "envelope": self.envelope}
        return json.dumps(head, separators=(",", ":")).encode() + b"\n" + self.body

    @classmethod
    def from_bytes(cls, data: bytes) -> OutboundMessage:
        line, _, body = data.partition(b"\n")
        head = json.loads(line)
        return cls(head["id"], head["envelope"], body)


class Publisher(Protocol):
    """An engine client.

    C{publish} returns a Deferred that fires once the engine holds the
    message and fails with L{EngineUnavailable} or L{EngineRefused}
    otherwise; while the publisher knows the engine is unreachable it fails
    at once rather than waiting for a timeout.
    """

    #: the target without credentials, for logs and replies
    name: str

    @property
    def max_size(self) -> int:
        """Largest body (bytes) the engine takes; 0 when not known yet."""

    def start(self) -> None:
        """Begin connecting (called once the reactor runs)."""

    def stop(self) -> Optional[Deferred[Any]]:
        """Close the connection (called before reactor shutdown)."""

    def publish(self, message: OutboundMessage) -> Deferred[Any]: ...


def with_timeout(
    deferred: Deferred[Any], seconds: float, reactor: Any, what: str
) -> Deferred[Any]:
    """A Deferred that fires like C{deferred}, or fails with
    L{EngineUnavailable} if that takes longer than C{seconds}.

    The original is left alone (not cancelled): a late ack is harmless, the
    id stays the same and consumers deduplicate on it.
    """
    result: Deferred[Any] = Deferred()

    def expired() -> None:
        if not result.called:
            result.errback(EngineUnavailable(f"{what}: no answer in {seconds:g}s"))

    call = reactor.callLater(seconds, expired)

    def done(outcome: Any) -> None:
        if call.active():
            call.cancel()
        if not result.called:
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

    deferred.addBoth(done)
    return result


def reply_for(failure: Failure, name: str) -> SMTPError:
    """The 4xx a client gets when the engine did not take its message."""
    if failure.check(EngineRefused):
        return SMTPError(451, "4.3.0", f"{name} did not take the message; try later")
    if not failure.check(EngineUnavailable):
        _log.failure("smtpd: publishing to {name} failed", failure, name=name)
    return SMTPError(451, "4.4.1", f"{name} is not reachable now; try later")


class BrokerHandler:
    """Hand each message to a broker; 250 only once the broker (or the
    spool) holds it.

    Args:
        publisher: the engine client.
        timeout: seconds the engine gets to acknowledge a message.
        spool: where messages go when the engine does not take them
            (C{None}: answer 451 instead).
        reactor: for timeouts.

    C{start()} once the reactor runs and C{stop()} before it stops
    (L{make_handler} arranges both).
    """

    def __init__(
        self,
        publisher: Publisher,
        *,
        timeout: float,
        reactor: Any,
        spool: Optional[Spool] = None,
    ) -> None:
        self.publisher = publisher
        self.timeout = timeout
        self.spool = spool
        self._reactor = reactor
        self._stopped = False

    def start(self) -> None:
        self.publisher.start()
        if self.spool is not None:
            self.spool.start()

    def stop(self) -> Optional[Deferred[Any]]:
        if self._stopped:
            return None
        self._stopped = True
        if self.spool is not None:
            self.spool.close()
        return self.publisher.stop()

    def _too_big(self, size: int) -> bool:
        limit = self.publisher.max_size
        return bool(limit) and size > limit

    def check_sender(self, envelope: Envelope) -> None:
        declared = envelope.mail_options.get("SIZE")
        if declared and declared.isdigit() and self._too_big(int(declared)):
            raise self._size_error()

    def _size_error(self) -> SMTPError:
        return SMTPError(
            552,
            "5.3.4",
            f"Message too big for {self.publisher.name}"
            f" (at most {self.publisher.max_size} bytes)",
        )

    def handle_message(self, envelope: Envelope) -> Deferred[str]:
        message = OutboundMessage.from_envelope(envelope)
        if self._too_big(len(message.body)):
            return fail(self._size_error())
        if self.spool is not None:
            return self.spool.accept(message)
        published = self.publish(message)
        return published.addCallbacks(lambda _: message.message_id, self._refused)

    def publish(self, message: OutboundMessage) -> Deferred[Any]:
        """Publish with this handler's timeout."""
        try:
            started = self.publisher.publish(message)
        except Exception:
            started = fail()
        return with_timeout(started, self.timeout, self._reactor, self.publisher.name)

    def _refused(self, failure: Failure) -> Failure:
        return Failure(reply_for(failure, self.publisher.name))


def make_handler(publisher: Publisher, options: Any, reactor: Any) -> BrokerHandler:
    """The handler for C{publisher} with the command line's timeout and
    spool."""
    spool = None
    if options.spool_dir:
        from .spool import Spool

        spool = Spool(options.spool_dir, reactor=reactor)
    handler = BrokerHandler(
        publisher, timeout=options.timeout, reactor=reactor, spool=spool
    )
    if spool is not None:
        spool.attach(handler.publish, publisher.name)
    reactor.callWhenRunning(handler.start)
    # "during", not "before": the server drains the messages in flight in
    # "before" (--shutdown-grace), and they still need the engine's ack.
    reactor.addSystemEventTrigger("during", "shutdown", handler.stop)
    return handler


def missing_extra(scheme: str, extra: str, module: str) -> ValueError:
    return ValueError(
        f"--deliver {scheme}:// needs the {module} package:"
        f" pip install 'twisted_smtpd[{extra}]'"
    )
