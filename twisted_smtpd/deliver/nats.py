# -*- test-case-name: tests.test_deliver_nats -*-
"""
C{--deliver nats://[user:pass@]host:port?subject=S[&stream=NAME]}: a
NATS JetStream publish.

Each message is published on C{subject} with the message (our
C{Received:} header first) as the payload and headers C{Nats-Msg-Id} = our
id, so JetStream drops a second copy within the stream's duplicate window
(2 minutes unless configured), plus the envelope as C{Smtpd-Mail-From},
C{Smtpd-Rcpt-To} (a JSON array), C{Smtpd-Peer}, C{Smtpd-Helo},
C{Smtpd-Session}, C{Smtpd-Received-At}, C{Smtpd-Size} (and C{Smtpd-Tls},
C{Smtpd-Auth}).  The client's 250 waits for JetStream's publish ack, which
the stream's leader sends once the message is stored (on a quorum of
replicas for replicated streams; file storage syncs to disk every 2
minutes by default, C{sync_interval}/C{sync_always} in the server's
C{jetstream} block tighten that).

Stream: without C{stream=}, a stream must already capture C{subject} (the
operator's retention, replicas and limits); no stream means no ack and
C{451}.  With C{stream=NAME}, that stream is created at start-up if it does
not exist (file storage, subjects C{[subject]}, the server's defaults
otherwise); an existing one is used as it is.

Client: nats-py is asyncio-only and our reactor is epoll, so it runs on an
asyncio loop in a dedicated thread; calls cross with
C{run_coroutine_threadsafe} and come back with C{callFromThread}.  nats-py
reconnects by itself once connected; the first connection is retried with
back-off.  While disconnected, publishes fail at once (C{451} or the spool).

Size: C{max_payload} of the server, 1 MiB by default (up to 64 MiB in the
server configuration), counts payload and headers; we answer 552 above it,
less 4 KiB for the headers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable
from typing import Any, Callable, Optional
from urllib.parse import parse_qsl, unquote, urlsplit

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from ._broker import (
    BrokerHandler,
    EngineRefused,
    EngineUnavailable,
    OutboundMessage,
    make_handler,
    missing_extra,
)

__all__ = ["NATSPublisher", "from_target"]

_log = Logger()

#: room left in max_payload for our headers
HEADER_ROOM = 4096


def from_target(target: str, options: Any, reactor: Any) -> BrokerHandler:
    """The handler for a C{nats://} target."""
    try:
        import nats  # noqa: F401
    except ImportError:
        raise missing_extra("nats", "nats", "nats-py")
    publisher = NATSPublisher.from_url(target, reactor=reactor, timeout=options.timeout)
    return make_handler(publisher, options, reactor)


def _header_name(key: str) -> str:
    return "Smtpd-" + "-".join(part.capitalize() for part in key.split("_"))


class _AsyncioThread:
    """An asyncio loop in a daemon thread, driven from the reactor."""

    def __init__(self, reactor: Any, name: str) -> None:
        self._reactor = reactor
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def call(self, function: Callable[[], Awaitable[Any]]) -> Deferred[Any]:
        """Run C{function()} on the loop; a Deferred of its result."""
        result: Deferred[Any] = Deferred()

        async def run() -> Any:
            return await function()

        future = asyncio.run_coroutine_threadsafe(run(), self.loop)

        def done(_: Any) -> None:
            self._reactor.callFromThread(_settle, result, future)

        future.add_done_callback(done)
        return result

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)


def _settle(deferred: Deferred[Any], future: Any) -> None:
    if future.cancelled():
        deferred.errback(EngineUnavailable("cancelled"))
    elif future.exception() is not None:
        deferred.errback(future.exception())
    else:
        deferred.callback(future.result())


class NATSPublisher:
    """JetStream publishes over one nats-py connection in its own thread."""

    retry_initial = 0.5
    retry_max = 30.0

    def __init__(
        self,
        server: str,
        *,
        subject: str,
        stream: Optional[str],
        name: str,
        reactor: Any,
        timeout: float,
        user: Optional[str] = None,
        password: Optional[str] = None,
    ) -> None:
        self.server = server
        self.subject = subject
        self.stream = stream
        self.name = name
        self._reactor = reactor
        self._timeout = timeout
        self._credentials = {"user": user, "password": password} if user else {}
        self._loop: Any = None
        self._client: Any = None
        self._jetstream: Any = None
        self._max_payload = 0
        self._stopping = False
        self._started = False
        self._ready_waiters: list[Deferred[None]] = []

    @classmethod
    def from_url(
        cls, target: str, *, reactor: Any, timeout: float = 60.0
    ) -> NATSPublisher:
        parts = urlsplit(target)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        subject = query.pop("subject", "")
        stream = query.pop("stream", "") or None
        if not subject:
            raise ValueError("--deliver nats:// needs subject=SUBJECT")
        if any(c in subject for c in " \t\r\n") or subject.startswith("."):
            raise ValueError(f"--deliver nats://: {subject!r} is not a NATS subject")
        if query:
            raise ValueError(
                f"--deliver nats://: unknown parameter {sorted(query)[0]!r}"
                " (known: subject, stream)"
            )
        if not parts.hostname:
            raise ValueError("--deliver nats:// needs a host: nats://HOST:PORT")
        try:
            port = parts.port or 4222
        except ValueError:
            raise ValueError("--deliver nats:// has a bad port")
        where = f"subject {subject!r}" + (f", stream {stream!r}" if stream else "")
        return cls(
            f"nats://{parts.hostname}:{port}",
            subject=subject,
            stream=stream,
            name=f"nats://{parts.hostname}:{port} ({where})",
            reactor=reactor,
            timeout=timeout,
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    @property
    def max_size(self) -> int:
        return max(self._max_payload - HEADER_ROOM, 0)

    @property
    def connected(self) -> bool:
        client = self._client
        return client is not None and client.is_connected

    def when_ready(self) -> Deferred[None]:
        """Fires once connected (and the stream exists, with C{stream=})."""
        if self._jetstream is not None and self.connected:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._ready_waiters.append(waiter)
        return waiter

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._loop = _AsyncioThread(self._reactor, "smtpd-nats")
        self._loop.start()
        self._loop.call(self._connect_forever).addErrback(
            lambda failure: _log.failure("smtpd: NATS connect loop", failure)
        )

    def stop(self) -> Optional[Deferred[Any]]:
        if not self._started or self._stopping:
            return None
        self._stopping = True

        async def close() -> None:
            if self._client is not None and not self._client.is_closed:
                await self._client.close()

        closed = self._loop.call(close)
        closed.addErrback(lambda _: None)
        closed.addBoth(lambda _: self._loop.stop())
        return closed

    # -- in the asyncio thread ---------------------------------------------------
    async def _connect_forever(self) -> None:
        import nats

        delay = self.retry_initial
        while not self._stopping:
            try:
                client = await nats.connect(
                    servers=[self.server],
                    connect_timeout=min(self._timeout, 10.0),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=min(delay, 2.0),
                    disconnected_cb=self._disconnected,
                    reconnected_cb=self._reconnected,
                    error_cb=self._error,
                    **self._credentials,
                )
                jetstream = client.jetstream(timeout=self._timeout)
                if self.stream:
                    await self._ensure_stream(jetstream)
            except Exception as error:
                self._reactor.callFromThread(
                    _log.warn,
                    "smtpd: {name} is not reachable ({why}); retrying in {delay:g}s",
                    name=self.name,
                    why=str(error) or type(error).__name__,
                    delay=delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            self._client = client
            self._jetstream = jetstream
            self._max_payload = client.max_payload
            self._reactor.callFromThread(self._ready, "connected to")
            return

    async def _ensure_stream(self, jetstream: Any) -> None:
        from nats.js.api import StorageType
        from nats.js.errors import NotFoundError

        try:
            await jetstream.stream_info(self.stream)
        except NotFoundError:
            await jetstream.add_stream(
                name=self.stream, subjects=[self.subject], storage=StorageType.FILE
            )
            self._reactor.callFromThread(
                _log.info,
                "smtpd: created JetStream stream {stream}",
                stream=self.stream,
            )

    async def _disconnected(self) -> None:
        if not self._stopping:
            self._reactor.callFromThread(
                _log.warn, "smtpd: {name} disconnected; reconnecting", name=self.name
            )

    async def _reconnected(self) -> None:
        self._reactor.callFromThread(self._ready, "reconnected to")

    async def _error(self, error: Exception) -> None:
        pass  # disconnected/reconnected say what matters; nats-py retries

    # -- in the reactor thread ---------------------------------------------------
    def _ready(self, what: str) -> None:
        _log.info("smtpd: {what} {name}", what=what, name=self.name)
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def publish(self, message: OutboundMessage) -> Deferred[Any]:
        jetstream = self._jetstream
        if jetstream is None or not self.connected:
            return fail(EngineUnavailable(f"{self.name}: not connected"))
        headers = {_header_name(k): v for k, v in message.string_fields().items()}
        del headers["Smtpd-Id"]
        headers["Nats-Msg-Id"] = message.message_id

        async def publish() -> Any:
            return await jetstream.publish(
                self.subject, message.body, timeout=self._timeout, headers=headers
            )

        return self._loop.call(publish).addErrback(self._translate)

    def _translate(self, failure: Any) -> Any:
        from nats import errors
        from nats.js import errors as js_errors

        if failure.check(errors.NoRespondersError, js_errors.NoStreamResponseError):
            raise EngineRefused(f"{self.name}: no JetStream stream takes the subject")
        if failure.check(js_errors.APIError):
            raise EngineRefused(f"{self.name}: {failure.getErrorMessage()}")
        if failure.check(errors.MaxPayloadError):
            raise EngineRefused(f"{self.name}: message over max_payload")
        raise EngineUnavailable(
            f"{self.name}: {failure.getErrorMessage() or failure.type.__name__}"
        )
