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
from typing import Any, Optional
from urllib.parse import quote, urlsplit, urlunsplit

# treq is an extra: without it handler_from_target says which to install.
import treq
from treq.client import HTTPClient
from twisted.internet import defer, task
from twisted.internet.defer import Deferred, succeed
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
        self, headers: dict[str, str], chunks: list[bytes], message_id: str
    ) -> None:
        deadline = self.reactor.seconds() + self.timeout
        delay = self.backoff
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - self.reactor.seconds()
            try:
                await self._attempt(headers, chunks, remaining)
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
        self, headers: dict[str, str], chunks: list[bytes], remaining: float
    ) -> None:
        raw = Headers(
            {k.encode("ascii"): [v.encode("latin-1")] for k, v in headers.items()}
        )
        try:
            response = await self._http.request(
                "POST",
                self.url,
                headers=raw,
                data=_ChunksProducer(chunks),
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


class _WebhookReceiver:
    """Collects one message, then POSTs it (the same bytes on each retry)."""

    def __init__(self, handler: WebhookHandler, envelope: Envelope) -> None:
        self._handler = handler
        self._headers = envelope_headers(envelope)
        self._envelope_key = (envelope.mail_from, list(envelope.rcpt_tos))
        prefix = (
            f"Return-Path: <{envelope.mail_from}>\r\n".encode(
                "utf-8", "surrogateescape"
            )
            + envelope.received_header
        )
        self._chunks: list[bytes] = [prefix]
        self._content_hash = hashlib.sha256()
        self._signature = (
            hmac.new(handler._secret, prefix, hashlib.sha256)
            if handler._secret
            else None
        )
        self._message_id = envelope.message_id

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._content_hash.update(data)
        if self._signature is not None:
            self._signature.update(data)

    def finish(self) -> Deferred[None]:
        headers = dict(self._headers)
        headers["Content-Type"] = "message/rfc822"
        mail_from, recipients = self._envelope_key
        headers["Idempotency-Key"] = idempotency_key(
            mail_from, recipients, self._content_hash.digest()
        )
        if self._signature is not None:
            headers["X-Smtpd-Signature"] = "sha256=" + self._signature.hexdigest()
        chunks, self._chunks = self._chunks, []
        return Deferred.fromCoroutine(
            self._handler.deliver(headers, chunks, self._message_id)
        )

    def abort(self) -> None:
        self._chunks = []


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
