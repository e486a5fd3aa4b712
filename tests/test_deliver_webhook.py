"""--deliver http://: a twisted.web receiver the tests run on loopback."""

from __future__ import annotations

import hashlib
import hmac
import smtplib

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.web import resource, server

from twisted_smtpd.deliver import DeliverOptions, handler_from_target
from twisted_smtpd.deliver.webhook import WebhookHandler

from .helpers import free_port


class Receiver(resource.Resource):
    """Answers POSTs from a script of status codes; records what came."""

    isLeaf = True

    def __init__(self, script=(200,)) -> None:
        super().__init__()
        self.script = list(script)
        self.requests: list[tuple[dict, bytes]] = []
        self.held: list = []

    def render_POST(self, request):
        headers = {
            k.decode().lower(): v[0].decode()
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.requests.append((headers, request.content.read()))
        status = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if status == "hang":
            self.held.append(request)
            return server.NOT_DONE_YET
        request.setResponseCode(status)
        return b"quota: no room for this sender" if status == 403 else b"ok"


@pytest.fixture
def web():
    """web(script) -> (receiver, url); the listener stops after the test."""
    ports = []

    def start(script=(200,)):
        receiver = Receiver(script)
        port = reactor.listenTCP(0, server.Site(receiver), interface="127.0.0.1")
        ports.append((port, receiver))
        return receiver, f"http://127.0.0.1:{port.getHost().port}/hook"

    yield start
    for port, receiver in ports:
        for request in receiver.held:
            if request.channel is not None:
                request.channel.transport.abortConnection()
        port.stopListening()


@pytest.fixture
def hooks():
    made = []

    def make(url, **kwargs):
        kwargs.setdefault("timeout", 10)
        handler = WebhookHandler(url, **kwargs)
        handler.backoff = 0.05
        made.append(handler)
        return handler

    yield make
    for handler in made:
        handler.close()


def in_thread(fn, *args):
    return threads.deferToThread(fn, *args)


MESSAGE = (
    b"From: s@example.org\r\nTo: a@example.net\r\nMessage-ID: <m1@example.org>\r\n"
    b"Subject: hook\r\n\r\nHello.\r\n.dot\r\n"
)


def send(port, recipients=("a@example.net", "b@example.net"), message=MESSAGE):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        try:
            smtp.sendmail("s@example.org", list(recipients), message)
        except smtplib.SMTPResponseException as error:
            return error.smtp_code, error.smtp_error
        return 250, b""


@pytest_twisted.inlineCallbacks
def test_post_carries_message_and_envelope(listen, web, hooks, tmp_path):
    """The body is what a Maildir stores; the envelope is in the headers;
    the signature verifies with the secret from the file."""
    receiver, url = web()
    secret = tmp_path / "hook.key"
    secret.write_bytes(b"hook-secret\n")
    handler = handler_from_target(
        f"{url}#secret-file={secret}", DeliverOptions(timeout=10), reactor
    )
    port = listen(handler)
    try:
        assert 250 == (yield in_thread(send, port))[0]
    finally:
        yield handler.close()
    ((headers, body),) = receiver.requests
    assert body.startswith(b"Return-Path: <s@example.org>\r\nReceived: from ")
    assert body.endswith(MESSAGE)
    assert "message/rfc822" == headers["content-type"]
    assert "s@example.org" == headers["x-smtpd-mail-from"]
    assert "a@example.net, b@example.net" == headers["x-smtpd-rcpt-to"]
    assert "127.0.0.1" == headers["x-smtpd-client-address"]
    expected = hmac.new(b"hook-secret", body, hashlib.sha256).hexdigest()
    assert f"sha256={expected}" == headers["x-smtpd-signature"]
    assert 64 == len(headers["idempotency-key"])


@pytest_twisted.inlineCallbacks
def test_500_then_200_is_one_250_with_one_key(listen, web, hooks):
    """A 500 is retried; the retry is the same bytes under the same key."""
    receiver, url = web([500, 200])
    port = listen(hooks(url))
    assert 250 == (yield in_thread(send, port))[0]
    (first, second) = receiver.requests
    assert first == second
    assert first[0]["idempotency-key"] == second[0]["idempotency-key"]


@pytest_twisted.inlineCallbacks
def test_client_retry_keeps_the_key(listen, web, hooks):
    """The same message sent again (a client's retry) gets the same key,
    although our Received: header differs: the application can dedupe."""
    receiver, url = web()
    port = listen(hooks(url))
    yield in_thread(send, port)
    yield in_thread(send, port)
    (one, _), (two, _) = receiver.requests
    assert one["idempotency-key"] == two["idempotency-key"]
    assert one["x-smtpd-message-id"] != two["x-smtpd-message-id"]
    yield in_thread(send, port, ("other@example.net",))
    assert receiver.requests[2][0]["idempotency-key"] != one["idempotency-key"]


@pytest_twisted.inlineCallbacks
def test_4xx_is_554_with_the_reason(listen, web, hooks):
    receiver, url = web([403])
    port = listen(hooks(url))
    code, text = yield in_thread(send, port)
    assert 554 == code
    assert text.startswith(b"5.7.1 Webhook refused the message: 403 Forbidden")
    assert b"quota: no room for this sender" in text
    assert 1 == len(receiver.requests)  # not retried


@pytest_twisted.inlineCallbacks
def test_503_until_the_deadline_is_451(listen, web, hooks):
    receiver, url = web([503])
    port = listen(hooks(url, timeout=1))
    code, text = yield in_thread(send, port)
    assert 451 == code and text.startswith(b"4.4.7"), text
    assert b"503" in text
    assert len(receiver.requests) >= 2


@pytest_twisted.inlineCallbacks
def test_hanging_webhook_is_451(listen, web, hooks):
    receiver, url = web(["hang"])
    port = listen(hooks(url, timeout=1))
    code, text = yield in_thread(send, port)
    assert 451 == code and b"no answer in time" in text, text


@pytest_twisted.inlineCallbacks
def test_refused_connection_is_451(listen, hooks):
    port = listen(hooks(f"http://127.0.0.1:{free_port()}/hook", timeout=1))
    code, text = yield in_thread(send, port)
    assert 451 == code and b"connection refused" in text, text


@pytest.mark.parametrize(
    "target, words",
    [
        ("http:///nohost", "expected http(s)://host/path"),
        ("http://h/x#secret=1", "unknown option 'secret'"),
        ("http://h/x#secret-file=/nonexistent", "cannot read secret-file"),
    ],
)
def test_bad_webhook_targets(target, words):
    with pytest.raises(ValueError) as error:
        handler_from_target(target, DeliverOptions(), reactor)
    assert words in str(error.value)


@pytest_twisted.inlineCallbacks
def test_big_message_spools_and_retries_byte_for_byte(listen, web, hooks):
    """Past the spool threshold the message waits in a temporary file; a
    500 then 200 gets the same bytes twice, signed the same."""
    from twisted_smtpd import Limits

    receiver, url = web([500, 200])
    handler = hooks(url, secret=b"k")
    handler.spool_threshold = 64 * 1024
    handler.max_in_flight = 256 * 1024
    port = listen(handler, limits=Limits(max_message_size=64 * 1024 * 1024))
    line = b"0123456789abcdef" * 6 + b"\r\n"
    message = MESSAGE + line * (3 * 1024 * 1024 // len(line))
    assert 250 == (yield in_thread(send, port, ("a@example.net",), message))[0]
    (h1, b1), (h2, b2) = receiver.requests
    assert b1 == b2 and b1.endswith(message) and len(b1) == int(h1["content-length"])
    assert h1["x-smtpd-signature"] == h2["x-smtpd-signature"]
    expected = hmac.new(b"k", b1, hashlib.sha256).hexdigest()
    assert f"sha256={expected}" == h1["x-smtpd-signature"]


@pytest_twisted.inlineCallbacks
def test_https_verified_against_deliver_ca(listen, certificates):
    """https:// checks the application's certificate: --deliver-ca trusts our
    test CA; without it the same server is refused (451, never 250)."""
    from twisted_smtpd.tls import TLSPolicy

    receiver = Receiver()
    policy = TLSPolicy.from_files(str(certificates["cert"]), str(certificates["key"]))
    context = policy.context_factory
    port = reactor.listenSSL(0, server.Site(receiver), context, interface="127.0.0.1")
    url = f"https://localhost:{port.getHost().port}/hook"
    trusted = handler_from_target(
        url, DeliverOptions(timeout=5, ca_file=str(certificates["ca"])), reactor
    )
    untrusted = WebhookHandler(url, timeout=1)
    try:
        assert 250 == (yield in_thread(send, listen(trusted)))[0]
        code, text = yield in_thread(send, listen(untrusted))
    finally:
        yield trusted.close()
        yield untrusted.close()
        port.stopListening()
    assert 1 == len(receiver.requests)
    assert 451 == code and b"certificate verify failed" in text, text
