"""--deliver redis://: a real redis-server, started once for this module."""

from __future__ import annotations

import json
import sys

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from twisted_smtpd.deliver import DeliverOptions, handler_from_target

from .brokers import TCPRelay, start_redis
from .helpers import free_port
from .test_deliver_amqp import queued_id, send


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory, certificates):
    server = start_redis(tmp_path_factory.mktemp("redis"), certificates)
    yield server
    server.stop()


@pytest.fixture
def client(redis_server):
    import redis

    with redis.Redis(port=redis_server.port) as client:
        yield client


@pytest_twisted.inlineCallbacks
def test_250_after_xadd_with_envelope_fields(redis_server, client, deliver_to):
    _, port = deliver_to(f"redis://127.0.0.1:{redis_server.port}/0?stream=mail")
    reply = yield threads.deferToThread(
        send, port, b"Subject: r\r\n\r\nredis\r\n", ("c@d.example", "e@f.example")
    )
    message_id = queued_id(reply)
    [(_, fields)] = client.xrange("mail")
    assert message_id.encode() == fields[b"id"]
    assert b"a@b.example" == fields[b"mail_from"]
    assert ["c@d.example", "e@f.example"] == json.loads(fields[b"rcpt_to"])
    assert b"client.example" == fields[b"helo"]
    assert fields[b"content"].startswith(b"Received: from client.example")
    assert fields[b"content"].endswith(b"Subject: r\r\n\r\nredis\r\n")


@pytest_twisted.inlineCallbacks
def test_rediss_verifies_the_server_with_deliver_ca(
    redis_server, client, deliver_to, certificates
):
    """rediss:// with --deliver-ca: 250; without it the test CA is not
    trusted, so the handshake fails and the client gets 451."""
    target = f"rediss://localhost:{redis_server.extra_ports['tls']}/3?stream=tls"
    _, port = deliver_to(target, ca_file=str(certificates["ca"]))
    reply = yield threads.deferToThread(send, port, b"Subject: t\r\n\r\ntls\r\n")
    message_id = queued_id(reply)
    client.select(3)
    assert [message_id.encode()] == [f[b"id"] for _, f in client.xrange("tls")]
    _, port = deliver_to(target)
    code, text = yield threads.deferToThread(send, port, b"Subject: u\r\n\r\nu\r\n")
    assert (451, True) == (code, text.startswith(b"4.4.1")), text
    assert 1 == client.xlen("tls")


@pytest_twisted.inlineCallbacks
def test_maxlen_trims_the_stream(redis_server, client, deliver_to):
    _, port = deliver_to(
        f"redis://127.0.0.1:{redis_server.port}/1?stream=short&maxlen=2"
    )
    ids = []
    for i in range(4):
        reply = yield threads.deferToThread(send, port, b"%d\r\n" % i)
        ids.append(queued_id(reply))
    client.select(1)
    assert [i.encode() for i in ids[2:]] == [
        f[b"id"] for _, f in client.xrange("short")
    ]


@pytest_twisted.inlineCallbacks
def test_out_of_memory_is_451_not_250(redis_server, client, deliver_to):
    """Redis refuses the write (maxmemory, noeviction): 451 4.3.0."""
    _, port = deliver_to(f"redis://127.0.0.1:{redis_server.port}/0?stream=oom")
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    try:
        code, text = yield threads.deferToThread(send, port, b"Subject: x\r\n\r\nx\r\n")
    finally:
        client.config_set("maxmemory", "0")
    assert (451, True) == (code, text.startswith(b"4.3.0")), text
    assert 0 == client.xlen("oom")


@pytest_twisted.inlineCallbacks
def test_too_few_replicas_is_451(redis_server, client, deliver_to):
    """replicas=1 and no replica answers WAIT in time: no 250 (the entry is
    on the primary only, which replicas=1 says is not enough)."""
    _, port = deliver_to(
        f"redis://127.0.0.1:{redis_server.port}/4?stream=safe&replicas=1", timeout=1
    )
    code, text = yield threads.deferToThread(send, port, b"Subject: x\r\n\r\nx\r\n")
    assert (451, True) == (code, text.startswith(b"4.3.0")), text


@pytest_twisted.inlineCallbacks
def test_server_down_is_451(deliver_to):
    _, port = deliver_to(f"redis://127.0.0.1:{free_port()}/0?stream=s")
    code, text = yield threads.deferToThread(send, port, b"Subject: x\r\n\r\nx\r\n")
    assert (451, True) == (code, text.startswith(b"4.4.1")), text


@pytest_twisted.inlineCallbacks
def test_down_with_spool_is_250_then_forwarded(
    redis_server, client, deliver_to, tmp_path
):
    relay = TCPRelay(redis_server.port)
    try:
        handler, port = deliver_to(
            f"redis://127.0.0.1:{relay.port}/2?stream=later",
            spool_dir=str(tmp_path / "spool"),
        )
        handler.spool.retry_initial = handler.spool.retry_max = 0.05
        relay.cut()
        reply = yield threads.deferToThread(send, port, b"Subject: s\r\n\r\ns\r\n")
        message_id = queued_id(reply)
        assert 1 == handler.spool.pending
        client.select(2)
        assert 0 == client.xlen("later")
        relay.restore()
        for _ in range(200):
            if handler.spool.pending == 0:
                break
            yield deferLater(reactor, 0.05)
        assert [message_id.encode()] == [f[b"id"] for _, f in client.xrange("later")]
    finally:
        relay.close()


@pytest.mark.parametrize(
    "target, expected",
    [
        ("redis://127.0.0.1:6379/0", "needs stream=NAME"),
        ("redis:///0?stream=s", "needs a host"),
        ("redis://127.0.0.1/0?stream=s&maxlen=lots", "maxlen must be a whole number"),
        ("redis://127.0.0.1/0?stream=s&bogus=1", "bogus"),
    ],
)
def test_bad_target_one_sentence(target, expected):
    with pytest.raises(ValueError, match=expected):
        handler_from_target(target, DeliverOptions(), reactor)


def test_missing_redis_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ValueError, match=r"pip install 'twisted_smtpd\[redis\]'"):
        handler_from_target("redis://127.0.0.1/0?stream=s", DeliverOptions(), reactor)


def test_call_queued_past_its_timeout_is_not_sent():
    """A call that waited in the pool until its client got 451 adds nothing
    (the client's retry would make it a second copy)."""
    import time

    from twisted_smtpd.deliver._broker import EngineUnavailable, OutboundMessage
    from twisted_smtpd.deliver.redis import RedisPublisher

    class Client:
        added: list = []

        def xadd(self, *args, **kwargs):
            self.added.append(args)
            return b"1-0"

    client = Client()
    publisher = RedisPublisher(client, stream="s", name="redis://x", reactor=reactor)
    message = OutboundMessage("ID", {"id": "ID"}, b"x")
    with pytest.raises(EngineUnavailable, match="busy past the timeout"):
        publisher._add_blocking(message, time.monotonic() - 1)
    assert [] == client.added
    assert "1-0" == publisher._add_blocking(message, time.monotonic() + 60)
    assert 1 == len(client.added)
