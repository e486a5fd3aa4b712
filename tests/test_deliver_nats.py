"""--deliver nats://: a real nats-server -js, started once for this module."""

from __future__ import annotations

import asyncio
import json
import smtplib
import sys

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from twisted_smtpd.deliver import DeliverOptions, handler_from_target
from twisted_smtpd.deliver._broker import OutboundMessage

from .brokers import TCPRelay, start_nats
from .helpers import free_port
from .test_deliver_amqp import queued_id, send


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory):
    server = start_nats(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


def stream_messages(port: int, stream: str) -> list:
    """(headers, data) of every message in C{stream}, oldest first."""
    import nats

    async def read() -> list:
        client = await nats.connect(f"nats://127.0.0.1:{port}")
        try:
            jetstream = client.jetstream()
            info = await jetstream.stream_info(stream)
            return [
                (message.headers, message.data)
                for seq in range(info.state.first_seq, info.state.last_seq + 1)
                if info.state.messages
                for message in [await jetstream.get_msg(stream, seq)]
            ]
        finally:
            await client.close()

    return asyncio.run(read())


@pytest_twisted.inlineCallbacks
def test_250_after_publish_ack_with_msg_id(nats_server, deliver_to):
    """stream= creates the stream; the message, its envelope and id are in it."""
    handler, port = deliver_to(
        f"nats://127.0.0.1:{nats_server.port}?subject=mail.in&stream=MAIL"
    )
    yield handler.publisher.when_ready()
    reply = yield threads.deferToThread(
        send, port, b"Subject: n\r\n\r\nnats\r\n", ("c@d.example", "e@f.example")
    )
    message_id = queued_id(reply)
    [(headers, data)] = yield threads.deferToThread(
        stream_messages, nats_server.port, "MAIL"
    )
    assert message_id == headers["Nats-Msg-Id"]
    assert "a@b.example" == headers["Smtpd-Mail-From"]
    assert ["c@d.example", "e@f.example"] == json.loads(headers["Smtpd-Rcpt-To"])
    assert data.startswith(b"Received: from client.example")
    assert data.endswith(b"Subject: n\r\n\r\nnats\r\n")


@pytest_twisted.inlineCallbacks
def test_same_id_is_stored_once(nats_server, deliver_to):
    """A second publish with the same Nats-Msg-Id (a spool replay) is dropped."""
    handler, _ = deliver_to(
        f"nats://127.0.0.1:{nats_server.port}?subject=dup.in&stream=DUP"
    )
    yield handler.publisher.when_ready()
    message = OutboundMessage("01TESTDEDUPE0000000000000A", {"id": "x"}, b"body\r\n")
    first = yield handler.publisher.publish(message)
    second = yield handler.publisher.publish(message)
    assert (False, True) == (bool(first.duplicate), second.duplicate)
    got = yield threads.deferToThread(stream_messages, nats_server.port, "DUP")
    assert 1 == len(got)


@pytest_twisted.inlineCallbacks
def test_no_stream_for_the_subject_is_451(nats_server, deliver_to):
    handler, port = deliver_to(f"nats://127.0.0.1:{nats_server.port}?subject=nowhere")
    yield handler.publisher.when_ready()
    code, text = yield threads.deferToThread(send, port, b"Subject: x\r\n\r\nx\r\n")
    assert (451, True) == (code, text.startswith(b"4.3.0")), text


@pytest_twisted.inlineCallbacks
def test_stream_limit_refusal_is_451(nats_server, deliver_to):
    """A full stream that discards new messages refuses the publish: 451."""
    import nats
    from nats.js.api import DiscardPolicy

    async def make_stream() -> None:
        client = await nats.connect(f"nats://127.0.0.1:{nats_server.port}")
        try:
            await client.jetstream().add_stream(
                name="FULL", subjects=["full.in"], max_msgs=1, discard=DiscardPolicy.NEW
            )
        finally:
            await client.close()

    yield threads.deferToThread(asyncio.run, make_stream())
    handler, port = deliver_to(f"nats://127.0.0.1:{nats_server.port}?subject=full.in")
    yield handler.publisher.when_ready()
    first = yield threads.deferToThread(send, port, b"Subject: 1\r\n\r\n1\r\n")
    queued_id(first)
    code, text = yield threads.deferToThread(send, port, b"Subject: 2\r\n\r\n2\r\n")
    assert (451, True) == (code, text.startswith(b"4.3.0")), text
    got = yield threads.deferToThread(stream_messages, nats_server.port, "FULL")
    assert 1 == len(got)


@pytest_twisted.inlineCallbacks
def test_over_max_payload_is_552(nats_server, deliver_to):
    """The server's 1 MiB max_payload: SIZE= and the message itself get 552."""
    handler, port = deliver_to(
        f"nats://127.0.0.1:{nats_server.port}?subject=big.in&stream=BIG"
    )
    yield handler.publisher.when_ready()
    assert 1024 * 1024 - 4096 == handler.publisher.max_size

    def big() -> tuple:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.ehlo()
            declared = smtp.mail("a@b.example", ["SIZE=2000000"])
            smtp.rset()
            smtp.mail("a@b.example")
            smtp.rcpt("c@d.example")
            return declared, smtp.data(b"Subject: big\r\n\r\n" + b"x" * 1_100_000)

    declared, data = yield threads.deferToThread(big)
    assert (552, 552) == (declared[0], data[0])
    assert data[1].startswith(b"5.3.4")


@pytest_twisted.inlineCallbacks
def test_server_down_is_451(deliver_to):
    _, port = deliver_to(f"nats://127.0.0.1:{free_port()}?subject=s")
    code, text = yield threads.deferToThread(send, port, b"Subject: x\r\n\r\nx\r\n")
    assert (451, True) == (code, text.startswith(b"4.4.1")), text


@pytest_twisted.inlineCallbacks
def test_down_with_spool_is_250_then_forwarded(nats_server, deliver_to, tmp_path):
    relay = TCPRelay(nats_server.port)
    try:
        handler, port = deliver_to(
            f"nats://127.0.0.1:{relay.port}?subject=later.in&stream=LATER",
            spool_dir=str(tmp_path / "spool"),
            timeout=5,
        )
        handler.spool.retry_initial = handler.spool.retry_max = 0.1
        yield handler.publisher.when_ready()
        relay.cut()
        for _ in range(100):
            if not handler.publisher.connected:
                break
            yield deferLater(reactor, 0.05)
        reply = yield threads.deferToThread(send, port, b"Subject: s\r\n\r\ns\r\n")
        message_id = queued_id(reply)
        assert 1 == handler.spool.pending
        relay.restore()
        for _ in range(200):
            if handler.spool.pending == 0:
                break
            yield deferLater(reactor, 0.05)
        got = yield threads.deferToThread(stream_messages, nats_server.port, "LATER")
        assert [message_id] == [headers["Nats-Msg-Id"] for headers, _ in got]
    finally:
        relay.close()


@pytest.mark.parametrize(
    "target, expected",
    [
        ("nats://127.0.0.1:4222", "needs subject=SUBJECT"),
        ("nats://127.0.0.1:4222?subject=a b", "is not a NATS subject"),
        ("nats://127.0.0.1:4222?subject=s&bogus=1", "unknown parameter 'bogus'"),
        ("nats://?subject=s", "needs a host"),
        ("nats://127.0.0.1:port?subject=s", "bad port"),
    ],
)
def test_bad_target_one_sentence(target, expected):
    with pytest.raises(ValueError, match=expected):
        handler_from_target(target, DeliverOptions(), reactor)


def test_missing_nats_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nats", None)
    with pytest.raises(ValueError, match=r"pip install 'twisted_smtpd\[nats\]'"):
        handler_from_target("nats://127.0.0.1?subject=s", DeliverOptions(), reactor)
