# -*- test-case-name: tests.test_deliver_amqp -*-
"""
C{--deliver amqp://user:pass@host:port/vhost?exchange=E&routing_key=K}:
RabbitMQ (AMQP 0-9-1) with publisher confirms.

Each message is published persistent (C{delivery_mode=2}), C{mandatory},
with the message as the body (C{content_type message/rfc822}), our id as
the C{message_id} property and the envelope as headers (C{id}, C{mail_from},
C{rcpt_to} as a list, C{peer}, C{helo}, C{session}, C{received_at},
C{size}, C{tls}, C{auth}).  The client's 250 waits for the broker's
C{basic.ack}; for a persistent message on a durable queue RabbitMQ sends it
once the message is on disk (or, for quorum queues, on a majority).  A
C{basic.nack}, a message no queue is bound to take (returned), a closed
channel, a broker that is down or silent for C{--deliver-timeout} seconds:
C{451}, or the spool with C{--spool}.

One connection and one confirm channel per process, through pika's Twisted
adapter; when either closes the publisher reconnects with back-off (0.5 s
doubling to 30 s), and while it is disconnected, or while RabbitMQ blocks
publishers on a memory or disk alarm, publishes fail at once.

The exchange, queues and bindings are the operator's: nothing is declared.
C{exchange} defaults to the default exchange, which routes by queue name,
so C{?routing_key=QUEUE} alone publishes into C{QUEUE}.  Other query
parameters are pika's (C{heartbeat}, C{connection_attempts}, ...).

Size: RabbitMQ refuses messages over its C{max_message_size} (128 MiB in
3.8-3.13, 16 MiB from 4.0).  We answer C{552 5.3.4} above C{max_size}
(query parameter, default 16 MiB) rather than have the broker close the
channel; raise both together.
"""

from __future__ import annotations

import time
from typing import Any, Optional
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from twisted.internet import endpoints
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._broker import (
    BrokerHandler,
    EngineRefused,
    EngineUnavailable,
    OutboundMessage,
    make_handler,
    missing_extra,
    with_timeout,
)

__all__ = ["AMQPPublisher", "from_target"]

_log = Logger()

DEFAULT_MAX_SIZE = 16 * 1024 * 1024


def from_target(target: str, options: Any, reactor: Any) -> BrokerHandler:
    """The handler for an C{amqp://} or C{amqps://} target."""
    try:
        import pika  # noqa: F401
    except ImportError:
        raise missing_extra("amqp", "amqp", "pika")
    publisher = AMQPPublisher.from_url(
        target, reactor=reactor, timeout=options.timeout, ca_file=options.ca_file
    )
    return make_handler(publisher, options, reactor)


def _trust_root(ca_file: Optional[str]) -> Any:
    from twisted.internet import ssl

    if ca_file is None:
        return ssl.platformTrust()
    try:
        with open(ca_file, "rb") as file:
            pem = file.read()
    except OSError as error:
        raise ValueError(f"cannot read --deliver-ca {ca_file!r}: {error.strerror}")
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + block for block in pem.split(marker)[1:]]
    if not blocks:
        raise ValueError(f"--deliver-ca {ca_file!r} holds no PEM certificate")
    return ssl.trustRootFromCertificates(
        [ssl.Certificate.loadPEM(block) for block in blocks]
    )


class AMQPPublisher:
    """One confirm channel to RabbitMQ, reconnected when it goes away."""

    retry_initial = 0.5
    retry_max = 30.0

    def __init__(
        self,
        parameters: Any,
        endpoint: Any,
        *,
        exchange: str,
        routing_key: str,
        name: str,
        reactor: Any,
        timeout: float,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self.name = name
        self.exchange = exchange
        self.routing_key = routing_key
        self._parameters = parameters
        self._endpoint = endpoint
        self._reactor = reactor
        self._timeout = timeout
        self._max_size = max_size
        self._connection: Any = None
        self._channel: Any = None
        self._stopping = False
        self._connecting = False
        self._retry_call: Any = None
        self._delay = self.retry_initial
        self._reported_down = False
        self._blocked: Optional[str] = None
        #: fires each time a channel is ready (tests wait on it)
        self._ready_waiters: list[Deferred[None]] = []

    @classmethod
    def from_url(
        cls,
        target: str,
        *,
        reactor: Any,
        timeout: float = 60.0,
        ca_file: Optional[str] = None,
    ) -> AMQPPublisher:
        import pika

        parts = urlsplit(target)
        scheme = parts.scheme.lower()
        if scheme not in ("amqp", "amqps"):
            raise ValueError(f"--deliver {target!r} is not an amqp:// URL")
        if not parts.hostname:
            raise ValueError(f"--deliver {scheme}:// needs a host: {scheme}://HOST")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        exchange = query.pop("exchange", "")
        routing_key = query.pop("routing_key", "")
        max_size_text = query.pop("max_size", str(DEFAULT_MAX_SIZE))
        if not max_size_text.isdigit() or int(max_size_text) < 1:
            raise ValueError(f"--deliver {scheme}: max_size must be a whole number")
        if not exchange and not routing_key:
            raise ValueError(
                f"--deliver {scheme}:// needs routing_key=QUEUE (the default"
                " exchange routes by queue name) or exchange=NAME"
            )
        try:
            port = parts.port or (5671 if scheme == "amqps" else 5672)
        except ValueError:
            raise ValueError(f"--deliver {scheme}:// has a bad port")
        # pika parses credentials, vhost and its own options; the transport
        # is ours (the Twisted adapter ignores host, port and TLS settings).
        plain = parts._replace(scheme="amqp", query=urlencode(query))
        try:
            parameters = pika.URLParameters(plain.geturl())
        except ValueError as error:
            raise ValueError(f"--deliver {scheme}://: {error}")
        if scheme == "amqps":
            from twisted.internet import ssl

            tls = ssl.optionsForClientTLS(parts.hostname, _trust_root(ca_file))
            endpoint: Any = endpoints.SSL4ClientEndpoint(
                reactor, parts.hostname, port, tls, timeout=timeout
            )
        else:
            endpoint = endpoints.HostnameEndpoint(
                reactor, parts.hostname, port, timeout=timeout
            )
        vhost = quote(parameters.virtual_host, safe="")
        where = f"exchange {exchange!r}" if exchange else f"queue {routing_key!r}"
        name = f"{scheme}://{parts.hostname}:{port}/{vhost} ({where})"
        return cls(
            parameters,
            endpoint,
            exchange=exchange,
            routing_key=routing_key,
            name=name,
            reactor=reactor,
            timeout=timeout,
            max_size=int(max_size_text),
        )

    @property
    def max_size(self) -> int:
        return self._max_size

    @property
    def connected(self) -> bool:
        return self._channel is not None

    def when_ready(self) -> Deferred[None]:
        """Fires once a confirm channel is open (now, if it is)."""
        if self._channel is not None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._ready_waiters.append(waiter)
        return waiter

    # -- connection --------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._connect()

    def stop(self) -> Optional[Deferred[Any]]:
        self._stopping = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        connection, self._connection = self._connection, None
        self._channel = None
        if connection is None or connection.is_closed:
            return None
        closed = connection.close()
        if closed is None:
            return None
        # Shutdown must not hang on a silent broker.
        return with_timeout(closed, 5, self._reactor, self.name).addErrback(
            lambda _: None
        )

    def _connect(self) -> None:
        if self._connecting or self._stopping or self._connection is not None:
            return
        self._connecting = True
        self._open().addErrback(self._connect_failed)

    @inlineCallbacks
    def _open(self) -> Any:
        from pika.adapters.twisted_connection import TwistedProtocolConnection

        protocol = TwistedProtocolConnection(
            self._parameters, custom_reactor=self._reactor
        )
        connection = yield endpoints.connectProtocol(self._endpoint, protocol)
        try:
            yield with_timeout(protocol.ready, self._timeout, self._reactor, self.name)
            channel = yield protocol.channel()
            yield channel.confirm_delivery()
        except BaseException:
            protocol.transport.abortConnection()
            raise
        self._connecting = False
        if self._stopping:
            protocol.close()
            return
        self._connection = connection
        self._channel = channel
        self._delay = self.retry_initial
        if self._reported_down:
            _log.info("smtpd: {name} is reachable again", name=self.name)
        else:
            _log.info("smtpd: connected to {name}", name=self.name)
        self._reported_down = False
        self._blocked = None
        # RabbitMQ blocks publishers on a memory or disk alarm; until it
        # unblocks, new messages fail at once instead of each waiting out the
        # timeout.  (pika's Twisted wrapper does not expose these hooks.)
        protocol._impl.add_on_connection_blocked_callback(self._on_blocked)
        protocol._impl.add_on_connection_unblocked_callback(self._on_unblocked)
        protocol.closed.addBoth(self._connection_lost, protocol)
        channel.on_closed.addBoth(self._channel_lost, channel, protocol)
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _on_blocked(self, connection: Any, frame: Any) -> None:
        self._blocked = getattr(frame.method, "reason", "") or "resource alarm"
        _log.warn(
            "smtpd: {name} blocks publishing ({reason})",
            name=self.name,
            reason=self._blocked,
        )

    def _on_unblocked(self, connection: Any, frame: Any) -> None:
        self._blocked = None
        _log.info("smtpd: {name} takes messages again", name=self.name)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = False
        self._lost(failure.getErrorMessage() or failure.type.__name__)

    def _channel_lost(self, reason: Any, channel: Any, protocol: Any) -> None:
        if self._channel is channel:
            self._channel = None
            # One channel per connection: start afresh.
            if not protocol.is_closed:
                protocol.close()
            else:
                self._connection_lost(reason, protocol)
        return None

    def _connection_lost(self, reason: Any, protocol: Any) -> None:
        if self._connection is protocol:
            self._connection = None
            self._channel = None
            self._blocked = None
            self._lost(str(getattr(reason, "value", reason)))
        return None

    def _lost(self, why: str) -> None:
        if self._stopping:
            return
        delay = self._delay
        self._delay = min(self._delay * 2, self.retry_max)
        if not self._reported_down or delay >= self.retry_max:
            _log.warn(
                "smtpd: {name} is not reachable ({why}); retrying in {delay:g}s",
                name=self.name,
                why=why,
                delay=delay,
            )
        self._reported_down = True
        self._retry_call = self._reactor.callLater(delay, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        self._connect()

    # -- publishing --------------------------------------------------------------
    def publish(self, message: OutboundMessage) -> Deferred[Any]:
        import pika

        channel = self._channel
        if channel is None or not channel.is_open:
            return fail(EngineUnavailable(f"{self.name}: not connected"))
        if self._blocked is not None:
            return fail(EngineUnavailable(f"{self.name}: blocked ({self._blocked})"))
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=message.message_id,
            content_type="message/rfc822",
            timestamp=int(time.time()),
            app_id="twisted_smtpd",
            headers=message.envelope,
        )
        published = channel.basic_publish(
            self.exchange,
            self.routing_key,
            message.body,
            properties,
            mandatory=True,
        )
        return published.addErrback(self._translate)

    def _translate(self, failure: Failure) -> Failure:
        from pika import exceptions

        if failure.check(exceptions.NackError):
            return Failure(EngineRefused(f"{self.name} nacked the message"))
        if failure.check(exceptions.UnroutableError):
            return Failure(
                EngineRefused(f"{self.name}: no queue is bound to take the message")
            )
        return Failure(EngineUnavailable(f"{self.name}: {failure.getErrorMessage()}"))
