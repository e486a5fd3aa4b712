# -*- test-case-name: tests.test_deliver_redis -*-
"""
C{--deliver redis://[user:pass@]host:port/db?stream=S[&maxlen=N][&replicas=R]}
(and C{rediss://}): C{XADD} to a Redis stream.

Each message becomes one stream entry whose fields are the envelope (C{id},
C{mail_from}, C{rcpt_to} as a JSON array, C{peer}, C{helo}, C{session},
C{received_at}, C{size}, and C{tls}/C{auth} when present) plus C{content},
the message with our C{Received:} header first.  The client's 250 waits for
the C{XADD} reply (and, with C{replicas=R}, for C{WAIT R} to report within
half of C{--deliver-timeout} that many replicas have it).  C{maxlen=N}
trims the stream to N entries (C{maxlen=~N}: approximately, which is
cheaper).

How durable that reply is depends on the server: with C{appendonly yes}
and C{appendfsync always} Redis fsyncs the entry before replying; with
C{everysec} (the default when AOF is on) a power loss can take the last
second; with RDB snapshots only (the default) everything since the last
snapshot.  C{replicas=R} covers the loss of one machine instead.

Redis has no deduplication: consumers deduplicate on the C{id} field (a
spooled message may be published again after a crash).

Client: redis-py's synchronous client in a thread pool of its own
(C{maxthreads} 8, one connection per thread at most).  redis-py is the
maintained client; its asyncio flavour would need the asyncio reactor, and
txredisapi has seen little maintenance.  An C{XADD} is one short round trip,
so a few threads carry thousands of messages per second, and a stuck call is
bounded by the socket timeout (C{--deliver-timeout}).

Size: a bulk string is at most C{proto-max-bulk-len} (512 MiB by default);
C{max_size=} (default 512 MiB) makes us answer 552 above it.
"""

from __future__ import annotations

import time
from typing import Any, Optional
from urllib.parse import parse_qsl, urlencode, urlsplit

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from ._broker import (
    BrokerHandler,
    EngineRefused,
    EngineUnavailable,
    OutboundMessage,
    make_handler,
    missing_extra,
)

__all__ = ["RedisPublisher", "from_target"]

DEFAULT_MAX_SIZE = 512 * 1024 * 1024
THREADS = 8


def from_target(target: str, options: Any, reactor: Any) -> BrokerHandler:
    """The handler for a C{redis://} or C{rediss://} target."""
    try:
        import redis  # noqa: F401
    except ImportError:
        raise missing_extra("redis", "redis", "redis")
    publisher = RedisPublisher.from_url(
        target, reactor=reactor, timeout=options.timeout, ca_file=options.ca_file
    )
    return make_handler(publisher, options, reactor)


def _whole(scheme: str, name: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--deliver {scheme}: {name} must be a whole number")
    return int(text)


class RedisPublisher:
    """C{XADD} through redis-py in a bounded thread pool."""

    def __init__(
        self,
        client: Any,
        *,
        stream: str,
        name: str,
        reactor: Any,
        maxlen: Optional[int] = None,
        approximate: bool = False,
        replicas: int = 0,
        timeout: float = 60.0,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self.client = client
        self.stream = stream
        self.name = name
        self.maxlen = maxlen
        self.approximate = approximate
        self.replicas = replicas
        self._timeout = timeout
        self._max_size = max_size
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=THREADS, name="smtpd-redis")

    @classmethod
    def from_url(
        cls,
        target: str,
        *,
        reactor: Any,
        timeout: float = 60.0,
        ca_file: Optional[str] = None,
    ) -> RedisPublisher:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        parts = urlsplit(target)
        scheme = parts.scheme.lower()
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        stream = query.pop("stream", "")
        if not stream:
            raise ValueError(f"--deliver {scheme}:// needs stream=NAME")
        if not parts.hostname:
            raise ValueError(f"--deliver {scheme}:// needs a host: {scheme}://HOST")
        maxlen_text = query.pop("maxlen", "")
        approximate = maxlen_text.startswith("~")
        maxlen = (
            _whole(scheme, "maxlen", maxlen_text.lstrip("~")) if maxlen_text else None
        )
        replicas_text = query.pop("replicas", "")
        replicas = _whole(scheme, "replicas", replicas_text) if replicas_text else 0
        max_size = _whole(
            scheme, "max_size", query.pop("max_size", str(DEFAULT_MAX_SIZE))
        )
        extra: dict[str, Any] = {}
        if scheme == "rediss" and ca_file:
            extra["ssl_ca_certs"] = ca_file
        try:
            client = redis.Redis.from_url(
                parts._replace(query=urlencode(query)).geturl(),
                socket_timeout=timeout,
                socket_connect_timeout=min(timeout, 10.0),
                # Our 451 or spool is the retry: fail fast while it is down.
                retry=Retry(NoBackoff(), 0),
                **extra,
            )
            # Unknown options only surface when a connection is made.
            client.connection_pool.make_connection()
        except (TypeError, ValueError) as error:
            raise ValueError(f"--deliver {scheme}://: {error}")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"--deliver {scheme}:// has a bad port")
        db = parts.path.strip("/") or "0"
        name = f"{scheme}://{parts.hostname}:{port}/{db} (stream {stream!r})"
        return cls(
            client,
            stream=stream,
            name=name,
            reactor=reactor,
            maxlen=maxlen,
            approximate=approximate,
            replicas=replicas,
            timeout=timeout,
            max_size=max_size,
        )

    @property
    def max_size(self) -> int:
        return self._max_size

    def start(self) -> None:
        if not self._pool.started:
            self._pool.start()

    def stop(self) -> None:
        # Each call in flight is bounded by the socket timeout.
        if self._pool.started:
            self._pool.stop()
        self.client.close()

    def publish(self, message: OutboundMessage) -> Deferred[Any]:
        if not self._pool.started:
            return fail(EngineUnavailable(f"{self.name}: not started"))
        deadline = time.monotonic() + self._timeout
        return deferToThreadPool(
            self._reactor, self._pool, self._add_blocking, message, deadline
        )

    def _add_blocking(self, message: OutboundMessage, deadline: float) -> str:
        import redis

        if time.monotonic() > deadline:
            # Queued behind slower calls until the client already got its
            # 451: adding it now would only make a copy the retry repeats.
            raise EngineUnavailable(f"{self.name}: busy past the timeout")

        fields: dict[str, Any] = dict(message.string_fields())
        fields["content"] = message.body
        try:
            entry = self.client.xadd(
                self.stream,
                fields,
                maxlen=self.maxlen,
                approximate=self.approximate,
            )
            if self.replicas:
                # Half the timeout: the answer must beat the socket timeout.
                wait_ms = max(int(self._timeout * 500), 1)
                copies = self.client.wait(self.replicas, wait_ms)
                if copies < self.replicas:
                    raise EngineRefused(
                        f"{self.name}: {copies} of {self.replicas} replicas have it"
                    )
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise EngineUnavailable(f"{self.name}: {error}")
        except redis.ResponseError as error:
            # OOM, READONLY replica, WRONGTYPE key, ...
            raise EngineRefused(f"{self.name}: {error}")
        return entry.decode() if isinstance(entry, bytes) else str(entry)
