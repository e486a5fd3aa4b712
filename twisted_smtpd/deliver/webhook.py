# -*- test-case-name: tests.test_deliver_webhook -*-
"""
C{--deliver http(s)://...}: POST each message to a web application (treq).

    --deliver https://app.example/inbound-mail
    --deliver 'https://app.example/inbound-mail#secret-file=/etc/smtpd/hook.key'

The fragment (never sent over HTTP) carries local options: C{secret-file=}
turns on an HMAC-SHA256 signature.  One POST per message; the body is the
exact bytes a Maildir would store (C{Return-Path:}, our C{Received:}, then
the message), C{Content-Type: message/rfc822}; the envelope rides in
headers (see L{envelope_headers}).  The client's 250 waits for a 2xx; 408,
429, 5xx, a refused connection or a timeout are retried with back-off
until C{--deliver-timeout} is spent, then the client gets 451; any other
4xx is 554 with the application's reason.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import tempfile
from typing import Any, Optional
from urllib.parse import quote, urlsplit, urlunsplit

# treq is an extra: without it handler_from_target says which to install.
import treq
from treq.client import HTTPClient
from twisted.internet import defer, task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from .._session import Envelope
from ..replies import Reply, SMTPError
from . import DeliverOptions

__all__ = [
    "WebhookHandler",
    "from_target",
    "envelope_headers",
    "idempotency_key",
    "sign",
]

_log = Logger(namespace="twisted_smtpd.deliver.webhook")

#: characters left as they are in the address headers (the rest %-encoded)
_ADDRESS_SAFE = "@!#$&'*+-/=?^_`{|}~.%"
#: the first this many bytes of a refusal's body go into the 554 text
_REASON_BYTES = 200
#: enhanced codes for the 554 after a refusing 4xx
_ENHANCED = {403: "5.7.1", 413: "5.3.4", 415: "5.6.0"}


def idempotency_key(
    mail_from: str, recipients: list[str], content_sha256: bytes
) -> str:
    """Stable for the same envelope and message bytes, so a client's retry of
    the same message gets the same key (our own C{Received:} is left out):
    hex SHA-256 of sender, NUL, each recipient and NUL, then the SHA-256
    digest of the client's message bytes."""
    outer = hashlib.sha256()
    outer.update(mail_from.encode("utf-8", "surrogateescape") + b"\0")
    for recipient in recipients:
        outer.update(recipient.encode("utf-8", "surrogateescape") + b"\0")
    outer.update(content_sha256)
    return outer.hexdigest()


def sign(secret: bytes, body: bytes) -> str:
    """The C{X-Smtpd-Signature} value for C{body}: C{sha256=<hex>}."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _address(value: str) -> str:
    return quote(value, safe=_ADDRESS_SAFE)


def envelope_headers(envelope: Envelope) -> dict[str, str]:
    """The envelope as HTTP headers (addresses %-encoded UTF-8)."""
    peer = envelope.peer
    headers = {
        "X-Smtpd-Mail-From": _address(envelope.mail_from),
        "X-Smtpd-Rcpt-To": ", ".join(_address(r) for r in envelope.rcpt_tos),
        "X-Smtpd-Client-Address": str(getattr(peer, "host", peer)),
        "X-Smtpd-Helo": quote(envelope.helo, safe=_ADDRESS_SAFE + "[]:"),
        "X-Smtpd-Message-Id": envelope.message_id,
        "X-Smtpd-Protocol": envelope.protocol_name,
    }
    tls = envelope.tls
    if tls is not None:
        headers["X-Smtpd-TLS"] = f"{tls.protocol} {tls.cipher}".strip() or "yes"
    if envelope.auth is not None:
        identity = envelope.auth
        if isinstance(identity, bytes):
            identity = identity.decode("utf-8", "replace")
        headers["X-Smtpd-Auth"] = quote(str(identity), safe=_ADDRESS_SAFE)
    return headers


@implementer(IBodyProducer)
class _ChunksProducer:
    """The message's chunks as a request body (the same for every retry)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks
        self.length = sum(len(chunk) for chunk in chunks)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        for chunk in self._chunks:
            consumer.write(chunk)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Retry(Exception):
    """A failure worth another attempt; C{reason} for the final 451."""

    def __init__(self, reason: str, delay: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class WebhookHandler:
    """POST every message to C{url}; 250 only after a 2xx.

    Args:
        url: C{http://} or C{https://}.
        timeout: seconds for all attempts together (then 451 4.4.7).
        secret: HMAC key for C{X-Smtpd-Signature} (C{secret_file} reads it).
        ca_file: PEM CA certificates for https (default: the system store).
        reactor: the reactor (default the global one).
    """

    #: messages bigger than this wait for their POST in a temporary file
    spool_threshold = 1024 * 1024
    #: pause the client while this many bytes wait for the disk
    max_in_flight = 4 * 1024 * 1024
    #: first retry delay; doubled per attempt up to L{max_backoff}
    backoff = 0.25
    max_backoff = 5.0

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 60.0,
        secret: Optional[bytes] = None,
        secret_file: Optional[str] = None,
        ca_file: Optional[str] = None,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--deliver {url!r}: expected http(s)://host/path")
        if secret_file is not None:
            try:
                with open(secret_file, "rb") as handle:
                    secret = handle.read().strip()
            except OSError as error:
                raise ValueError(
                    f"cannot read secret-file {secret_file!r}: {error.strerror}"
                )
            if not secret:
                raise ValueError(f"secret-file {secret_file!r} is empty")
        self.url = url
        self.timeout = timeout
        self.reactor = reactor
        self._secret = secret
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        policy = BrowserLikePolicyForHTTPS()
        if ca_file is not None:
            from .smtp import load_trust_root

            policy = BrowserLikePolicyForHTTPS(trustRoot=load_trust_root(ca_file))
        self._agent = Agent(reactor, contextFactory=policy, pool=self.pool)
        self._http = HTTPClient(self._agent)

    def close(self) -> Deferred[None]:
        """Close the kept-alive connections (shutdown, tests)."""
        return self.pool.closeCachedConnections()

    def open_message(self, envelope: Envelope) -> _WebhookReceiver:
        return _WebhookReceiver(self, envelope)

    # -- one delivery --
    async def deliver(
        self, headers: dict[str, str], body: Any, message_id: str
    ) -> None:
        """POST until a 2xx or the deadline; C{body()} makes each attempt's
        body producer."""
        deadline = self.reactor.seconds() + self.timeout
        delay = self.backoff
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - self.reactor.seconds()
            try:
                await self._attempt(headers, body(), remaining)
                return
            except _Retry as retry:
                wait = max(delay, retry.delay)
                delay = min(delay * 2, self.max_backoff)
                left = deadline - self.reactor.seconds()
                _log.info(
                    "webhook {url} attempt {attempt} for {message_id}: {reason}",
                    url=self.url,
                    attempt=attempt,
                    message_id=message_id,
                    reason=retry.reason,
                )
                # Another attempt needs time to be worth making.
                if wait + min(1.0, self.timeout / 4) >= left:
                    raise SMTPError(
                        Reply(
                            451,
                            "4.4.7",
                            f"Webhook did not take the message in time"
                            f" ({attempt} attempts, last: {retry.reason})",
                        )
                    )
                await task.deferLater(self.reactor, wait, lambda: None)

    async def _attempt(
        self, headers: dict[str, str], producer: Any, remaining: float
    ) -> None:
        raw = Headers(
            {k.encode("ascii"): [v.encode("latin-1")] for k, v in headers.items()}
        )
        try:
            response = await self._http.request(
                "POST",
                self.url,
                headers=raw,
                data=producer,
                timeout=max(remaining, 0.001),
            )
        except defer.CancelledError:
            raise _Retry("no answer in time")
        except Exception as error:
            raise _Retry(_error_text(error))
        code = response.code
        reason = await self._reason(response)
        if 200 <= code < 300:
            return
        phrase = (response.phrase or b"").decode("latin-1", "replace")
        described = f"{code} {phrase}".strip()
        if code in (408, 429) or code >= 500:
            raise _Retry(described, _retry_after(response))
        text = f"Webhook refused the message: {described}"
        if reason:
            text += f": {reason}"
        raise SMTPError(Reply(554, _ENHANCED.get(code, "5.0.0"), text))

    async def _reason(self, response: Any) -> str:
        """The first bytes of the response body as one line of text."""
        kept: list[bytes] = []
        size = [0]

        def collect(data: bytes) -> None:
            if size[0] < _REASON_BYTES:
                kept.append(data[: _REASON_BYTES - size[0]])
            size[0] += len(data)

        try:
            await treq.collect(response, collect)
        except Exception:
            pass
        text = b"".join(kept).decode("utf-8", "replace")
        return " ".join(text.split())


def _retry_after(response: Any) -> float:
    values = response.headers.getRawHeaders(b"retry-after") or []
    try:
        return float(values[0])
    except (IndexError, ValueError):
        return 0.0


def _error_text(error: Exception) -> str:
    failures = getattr(error, "reasons", None)
    if failures:
        error = failures[0].value
    name = type(error).__name__
    if isinstance(error, (defer.CancelledError, defer.TimeoutError)) or (
        "Cancelled" in name or "Timeout" in name
    ):
        return "no answer in time"
    text = str(error).strip()
    if "refused" in text.lower() or name == "ConnectionRefusedError":
        return "connection refused"
    return text or name


@implementer(IBodyProducer)
class _FileProducer:
    """A spooled message as a request body: read in a worker thread."""

    chunk_size = 64 * 1024

    def __init__(self, file: Any, length: int, reactor: Any) -> None:
        self._file = file
        self.length = length
        self._reactor = reactor
        self._paused: Optional[Deferred[None]] = None
        self._stopped = False

    def startProducing(self, consumer: Any) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        Deferred.fromCoroutine(self._run(consumer, done)).addErrback(done.errback)
        return done

    async def _run(self, consumer: Any, done: Deferred[None]) -> None:
        # pread at our own offset: a cancelled attempt's read still in a
        # thread cannot move the next attempt's position.
        fd = self._file.fileno()
        offset = 0
        while True:
            if self._paused is not None:
                await self._paused
            if self._stopped:
                return  # the Deferred must not fire after stopProducing
            data = await _in_thread(
                self._reactor, os.pread, fd, self.chunk_size, offset
            )
            offset += len(data)
            if self._stopped:
                return
            if not data:
                done.callback(None)
                return
            consumer.write(data)

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = Deferred()

    def resumeProducing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        self._stopped = True
        self.resumeProducing()


def _in_thread(reactor: Any, fn: Any, *args: Any) -> Deferred[Any]:
    return deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)


class _WebhookReceiver:
    """Collects one message, then POSTs it (the same bytes on each retry).

    Past C{spool_threshold} bytes the message goes to an unlinked temporary
    file, written and read in worker threads, so memory stays bounded; the
    client is paused while more than C{max_in_flight} bytes wait for disk.
    """

    def __init__(self, handler: WebhookHandler, envelope: Envelope) -> None:
        self._handler = handler
        self._reactor = handler.reactor
        self._headers = envelope_headers(envelope)
        self._envelope_key = (envelope.mail_from, list(envelope.rcpt_tos))
        prefix = (
            f"Return-Path: <{envelope.mail_from}>\r\n".encode(
                "utf-8", "surrogateescape"
            )
            + envelope.received_header
        )
        self._chunks: list[bytes] = [prefix]
        self._size = len(prefix)
        self._content_hash = hashlib.sha256()
        self._signature = (
            hmac.new(handler._secret, prefix, hashlib.sha256)
            if handler._secret
            else None
        )
        self._message_id = envelope.message_id
        self._file: Any = None
        self._io: Optional[Deferred[Any]] = None  # the chain of disk writes
        self._in_flight = 0
        self._producer: Any = None
        self._paused = False
        self._closed = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer

    def unregisterProducer(self) -> None:
        self._resume()
        self._producer = None

    def write(self, data: bytes) -> None:
        self._content_hash.update(data)
        if self._signature is not None:
            self._signature.update(data)
        self._size += len(data)
        self._chunks.append(data)
        if self._io is None and self._size <= self._handler.spool_threshold:
            return
        chunks, self._chunks = self._chunks, []
        pending = sum(len(c) for c in chunks)
        self._in_flight += pending
        if self._io is None:
            self._io = _in_thread(self._reactor, self._spool_first, chunks)
        else:
            self._io.addCallback(
                lambda _: _in_thread(self._reactor, self._spool_more, chunks)
            )
        self._io.addCallback(self._written, pending)
        if self._in_flight > self._handler.max_in_flight and self._producer:
            self._paused = True
            self._producer.pauseProducing()

    def _spool_first(self, chunks: list[bytes]) -> None:
        self._file = tempfile.TemporaryFile(prefix="smtpd-webhook-")
        self._spool_more(chunks)

    def _spool_more(self, chunks: list[bytes]) -> None:
        self._file.writelines(chunks)

    def _written(self, result: Any, size: int) -> Any:
        self._in_flight -= size
        if self._in_flight <= self._handler.max_in_flight // 2:
            self._resume()
        return result

    def _resume(self) -> None:
        if self._paused and self._producer is not None:
            self._paused = False
            self._producer.resumeProducing()

    def finish(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._finish())

    async def _finish(self) -> None:
        headers = dict(self._headers)
        headers["Content-Type"] = "message/rfc822"
        mail_from, recipients = self._envelope_key
        headers["Idempotency-Key"] = idempotency_key(
            mail_from, recipients, self._content_hash.digest()
        )
        if self._signature is not None:
            headers["X-Smtpd-Signature"] = "sha256=" + self._signature.hexdigest()
        try:
            if self._io is None:
                chunks, self._chunks = self._chunks, []
                body: Any = lambda: _ChunksProducer(chunks)  # noqa: E731
            else:
                rest, self._chunks = self._chunks, []
                try:
                    await self._io
                    await _in_thread(self._reactor, self._spool_more, rest)
                except Exception:
                    _log.failure("webhook: spooling {id} failed", id=self._message_id)
                    raise SMTPError(451, "4.3.0", "Could not spool the message")
                spooled, size = self._file, self._size
                body = lambda: _FileProducer(spooled, size, self._reactor)  # noqa: E731
            await self._handler.deliver(headers, body, self._message_id)
        finally:
            self._close()

    def abort(self) -> None:
        self._chunks = []
        self._resume()
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._io is not None:
            # After the writes in flight; TemporaryFile deletes on close.
            self._io.addBoth(lambda _: self._file and self._file.close())
            self._io.addErrback(lambda _: None)


def from_target(target: str, options: DeliverOptions, reactor: Any) -> WebhookHandler:
    """C{http(s)://host/path[#secret-file=PATH]} -> a L{WebhookHandler}."""
    parts = urlsplit(target)
    local = dict(item.partition("=")[::2] for item in parts.fragment.split("&") if item)
    unknown = sorted(set(local) - {"secret-file"})
    if unknown:
        raise ValueError(
            f"--deliver {target!r}: unknown option {unknown[0]!r} after '#'"
            " (known: secret-file)"
        )
    url = urlunsplit(parts._replace(fragment=""))
    return WebhookHandler(
        url,
        timeout=options.timeout,
        secret_file=local.get("secret-file") or None,
        ca_file=options.ca_file if parts.scheme == "https" else None,
        reactor=reactor,
    )
