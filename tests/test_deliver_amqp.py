"""--deliver amqp://: a real RabbitMQ, started once for this module."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import sys
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from twisted_smtpd.deliver import DeliverOptions, handler_from_target
from twisted_smtpd.deliver._broker import OutboundMessage

from .brokers import TCPRelay, rabbit_drain, rabbit_queue, rabbitmqctl, start_rabbitmq
from .helpers import free_port, start_twistd, wait_for_port

QUEUED = re.compile(rb"queued as ([0-9A-Z]{26})")


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory, certificates):
    server = start_rabbitmq(tmp_path_factory.mktemp("rabbitmq"), certificates)
    yield server
    server.stop()


@pytest.fixture
def relay(rabbit):
    relay = TCPRelay(rabbit.port)
    yield relay
    relay.close()


def send(port: int, body: bytes, rcpts=("c@d.example",)) -> tuple[int, bytes]:
    """One message over SMTP: the DATA reply (code, text)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("client.example")
        smtp.mail("a@b.example")
        for rcpt in rcpts:
            smtp.rcpt(rcpt)
        return smtp.data(body)


def queued_id(reply: tuple[int, bytes]) -> str:
    code, text = reply
    assert 250 == code, reply
    found = QUEUED.search(text)
    assert found, text
    return found.group(1).decode()


@pytest_twisted.inlineCallbacks
def test_250_after_confirm_with_envelope_and_id(rabbit, deliver_to):
    """The message, its envelope and our id arrive in the queue; 250 names it."""
    rabbit_queue(rabbit.port, "inbox")
    handler, port = deliver_to(
        f"amqp://guest:guest@{rabbit.url_host}/?routing_key=inbox"
    )
    yield handler.publisher.when_ready()
    reply = yield threads.deferToThread(
        send, port, b"Subject: hi\r\n\r\nbody\r\n", ("c@d.example", "e@f.example")
    )
    message_id = queued_id(reply)
    [(properties, body)] = yield threads.deferToThread(
        rabbit_drain, rabbit.port, "inbox", 1
    )
    assert message_id == properties.message_id
    assert 2 == properties.delivery_mode
    assert "message/rfc822" == properties.content_type
    headers = properties.headers
    assert "a@b.example" == headers["mail_from"]
    assert ["c@d.example", "e@f.example"] == headers["rcpt_to"]
    assert "127.0.0.1" == headers["peer"]
    assert "client.example" == headers["helo"]
    assert message_id == headers["id"]
    assert body.startswith(b"Received: from client.example")
    assert body.endswith(b"Subject: hi\r\n\r\nbody\r\n")


@pytest_twisted.inlineCallbacks
def test_amqps_verifies_the_broker_with_deliver_ca(rabbit, deliver_to, certificates):
    """amqps:// with --deliver-ca: 250; without it the test CA is not trusted
    (the system store is), so the handshake fails and the client gets 451."""
    rabbit_queue(rabbit.port, "secure")
    target = f"amqps://localhost:{rabbit.extra_ports['tls']}/?routing_key=secure"
    handler, port = deliver_to(target, ca_file=str(certificates["ca"]))
    yield handler.publisher.when_ready()
    reply = yield threads.deferToThread(send, port, b"Subject: t\r\n\r\ntls\r\n")
    message_id = queued_id(reply)
    got = yield threads.deferToThread(rabbit_drain, rabbit.port, "secure", 1)
    assert [message_id] == [properties.message_id for properties, _ in got]

    untrusting, port = deliver_to(target)
    code, text = yield threads.deferToThread(send, port, b"Subject: u\r\n\r\nu\r\n")
    assert (451, True) == (code, text.startswith(b"4.4.1")), text
    assert not untrusting.publisher.connected


@pytest_twisted.inlineCallbacks
def test_exchange_and_routing_key(rabbit, deliver_to):
    """exchange=E&routing_key=K publishes through the operator's exchange."""
    import pika

    params = pika.ConnectionParameters("127.0.0.1", rabbit.port)
    with pika.BlockingConnection(params) as connection:
        channel = connection.channel()
        channel.exchange_declare("mail", "direct", durable=True)
        channel.queue_declare("routed", durable=True)
        channel.queue_bind("routed", "mail", routing_key="inbound")
    handler, port = deliver_to(
        f"amqp://{rabbit.url_host}/%2F?exchange=mail&routing_key=inbound"
    )
    yield handler.publisher.when_ready()
    reply = yield threads.deferToThread(send, port, b"Subject: e\r\n\r\ne\r\n")
    got = yield threads.deferToThread(rabbit_drain, rabbit.port, "routed", 1)
    assert [queued_id(reply)] == [properties.message_id for properties, _ in got]


@pytest_twisted.inlineCallbacks
def test_unroutable_is_451_not_250(rabbit, deliver_to):
    """No queue takes the message (returned, then acked): the client gets 451."""
    handler, port = deliver_to(f"amqp://{rabbit.url_host}/?routing_key=nobody-here")
    yield handler.publisher.when_ready()
    code, text = yield threads.deferToThread(send, port, b"Subject: lost\r\n\r\nx\r\n")
    assert 451 == code
    assert text.startswith(b"4.3.0")


@pytest_twisted.inlineCallbacks
def test_nack_is_451(rabbit, deliver_to):
    """A full queue with reject-publish nacks: the second message gets 451."""
    rabbit_queue(
        rabbit.port, "tiny", {"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    handler, port = deliver_to(f"amqp://{rabbit.url_host}/?routing_key=tiny")
    yield handler.publisher.when_ready()
    first = yield threads.deferToThread(send, port, b"Subject: 1\r\n\r\n1\r\n")
    queued_id(first)
    code, text = yield threads.deferToThread(send, port, b"Subject: 2\r\n\r\n2\r\n")
    assert (451, True) == (code, text.startswith(b"4.3.0"))
    got = yield threads.deferToThread(rabbit_drain, rabbit.port, "tiny", 1)
    assert [b"1\r\n"] == [body[-3:] for _, body in got]


@pytest_twisted.inlineCallbacks
def test_broker_down_is_451_then_reconnects(rabbit, relay, deliver_to):
    """Connection cut: 451 at once; once it is back the publisher reconnects."""
    rabbit_queue(rabbit.port, "flaky")
    handler, port = deliver_to(f"amqp://127.0.0.1:{relay.port}/?routing_key=flaky")
    handler.publisher.retry_initial = handler.publisher.retry_max = 0.2
    yield handler.publisher.when_ready()
    relay.cut()
    code, text = yield threads.deferToThread(send, port, b"Subject: d\r\n\r\nd\r\n")
    assert (451, True) == (code, text.startswith(b"4.4.1")), text
    relay.restore()
    yield handler.publisher.when_ready()
    reply = yield threads.deferToThread(send, port, b"Subject: u\r\n\r\nu\r\n")
    message_id = queued_id(reply)
    got = yield threads.deferToThread(rabbit_drain, rabbit.port, "flaky", 1)
    assert [message_id] == [properties.message_id for properties, _ in got]


@pytest_twisted.inlineCallbacks
def test_memory_alarm_is_451_and_later_publishes_fail_at_once(rabbit, deliver_to):
    """A broker that blocks publishers (memory alarm): 451, and once RabbitMQ
    says the connection is blocked, publishes fail at once instead of each
    waiting out the timeout; after the alarm clears, 250 again."""
    rabbit_queue(rabbit.port, "alarm")
    handler, port = deliver_to(
        f"amqp://{rabbit.url_host}/?routing_key=alarm", timeout=2
    )
    publisher = handler.publisher
    yield publisher.when_ready()
    yield threads.deferToThread(
        rabbitmqctl, rabbit, "set_vm_memory_high_watermark", "0"
    )
    try:
        code, text = yield threads.deferToThread(send, port, b"Subject: a\r\n\r\na\r\n")
        assert (451, True) == (code, text.startswith(b"4.4.1")), text
        for _ in range(200):
            if publisher._blocked is not None:
                break
            yield deferLater(reactor, 0.05)
        outcome: list = []
        publisher.publish(OutboundMessage("X", {}, b"x")).addErrback(outcome.append)
        assert 1 == len(outcome)  # failed before returning
        assert "blocked" in outcome[0].getErrorMessage()
    finally:
        yield threads.deferToThread(
            rabbitmqctl, rabbit, "set_vm_memory_high_watermark", "0.4"
        )
    for _ in range(200):
        if publisher._blocked is None:
            break
        yield deferLater(reactor, 0.05)
    reply = yield threads.deferToThread(send, port, b"Subject: b\r\n\r\nb\r\n")
    queued_id(reply)


@pytest_twisted.inlineCallbacks
def test_broker_down_at_start_is_451(deliver_to):
    """Nothing listens: 451 4.4.1, never a 250."""
    handler, port = deliver_to(f"amqp://127.0.0.1:{free_port()}/?routing_key=q")
    code, text = yield threads.deferToThread(send, port, b"Subject: d\r\n\r\nd\r\n")
    assert (451, True) == (code, text.startswith(b"4.4.1"))


@pytest_twisted.inlineCallbacks
def test_size_over_engine_limit_is_552(rabbit, deliver_to):
    """MAIL SIZE= over max_size is refused before the data is sent."""
    _, port = deliver_to(f"amqp://{rabbit.url_host}/?routing_key=q&max_size=1000")

    def mail() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo()
            return smtp.mail("a@b.example", ["SIZE=5000"])

    code, text = yield threads.deferToThread(mail)
    assert 552 == code and text.startswith(b"5.3.4")


@pytest.mark.parametrize(
    "target, expected",
    [
        ("amqp://127.0.0.1/", "needs routing_key=QUEUE"),
        ("amqp:///?routing_key=q", "needs a host"),
        ("amqp://127.0.0.1:port/?routing_key=q", "bad port"),
        ("amqp://127.0.0.1/?routing_key=q&bogus=1", "Unknown URL parameter"),
        ("amqp://127.0.0.1/?routing_key=q&max_size=big", "max_size"),
    ],
)
def test_bad_target_one_sentence(target, expected):
    with pytest.raises(ValueError, match=expected):
        handler_from_target(target, DeliverOptions(), reactor)


def test_missing_pika_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pika", None)
    with pytest.raises(ValueError, match=r"pip install 'twisted_smtpd\[amqp\]'"):
        handler_from_target(
            "amqp://127.0.0.1/?routing_key=q", DeliverOptions(), reactor
        )


def test_spool_survives_sigkill_and_forwards_in_order(rabbit, relay, tmp_path):
    """Broker down with --spool: 250s; SIGKILL; restart; the broker comes
    back and gets every message once, in order, with the ids of the 250s."""
    rabbit_queue(rabbit.port, "spooled")
    spool = tmp_path / "spool"
    smtp_port = free_port()
    args = (
        "--port",
        f"tcp:{smtp_port}:interface=127.0.0.1",
        "--deliver",
        f"amqp://127.0.0.1:{relay.port}/?routing_key=spooled",
        "--deliver-timeout",
        "5",
        "--spool",
        str(spool),
    )
    relay.cut()
    proc = start_twistd(tmp_path, *args)
    try:
        wait_for_port(smtp_port, proc)
        ids = [
            queued_id(send(smtp_port, f"Subject: {i}\r\n\r\n{i}\r\n".encode()))
            for i in range(3)
        ]
        assert 3 == len(os.listdir(spool / "queue"))
        proc.send_signal(signal.SIGKILL)
        first_output, _ = proc.communicate(timeout=10)
        assert "spooling it" in first_output
        proc = start_twistd(tmp_path, *args)
        wait_for_port(smtp_port, proc)
        ids.append(queued_id(send(smtp_port, b"Subject: 3\r\n\r\n3\r\n")))
        relay.restore()
        got = rabbit_drain(rabbit.port, "spooled", 4, seconds=30)
        assert ids == [properties.message_id for properties, _ in got]
        assert [f"{i}\r\n".encode() for i in range(4)] == [b[-3:] for _, b in got]
        # The spool empties once the last ack is in.
        for _ in range(100):
            if not os.listdir(spool / "queue"):
                break
            time.sleep(0.1)
        assert [] == os.listdir(spool / "queue")
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert "Traceback" not in output, output


def test_sigterm_waits_for_the_ack_of_a_message_in_flight(rabbit, tmp_path):
    """SIGTERM while the broker holds back its ack: the broker connection
    stays open through the drain, so the client still gets its 250."""
    rabbit_queue(rabbit.port, "drain")
    smtp_port = free_port()
    rabbitmqctl(rabbit, "set_vm_memory_high_watermark", "0")
    proc = start_twistd(
        tmp_path,
        "--port",
        f"tcp:{smtp_port}:interface=127.0.0.1",
        "--deliver",
        f"amqp://{rabbit.url_host}/?routing_key=drain",
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    reply: list = []
    try:
        wait_for_port(smtp_port, proc)
        for _ in range(100):
            if any("connected to amqp" in line for line in lines):
                break
            time.sleep(0.1)
        sent = threading.Event()
        client = threading.Thread(target=send_raw, args=(smtp_port, sent, reply))
        client.start()
        assert sent.wait(30)
        time.sleep(0.5)  # let the server read the final dot and publish
        proc.send_signal(signal.SIGTERM)
        for _ in range(100):
            if any("SIGTERM" in line for line in lines):
                break
            time.sleep(0.1)
    finally:
        rabbitmqctl(rabbit, "set_vm_memory_high_watermark", "0.4")
    client.join(30)
    proc.wait(30)
    reader.join(5)
    proc.stdout.close()
    message_id = queued_id(reply[0])
    assert 421 == reply[1][0]  # then the drain closes the session
    got = rabbit_drain(rabbit.port, "drain", 1)
    assert [message_id] == [properties.message_id for properties, _ in got]
    assert any("SIGTERM" in line for line in lines), lines


def send_raw(port: int, sent: threading.Event, replies: list) -> None:
    """One message over a plain socket; C{sent} is set once the final dot is
    out, then the DATA reply and the next one (the 421) are read."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        reader = sock.makefile("rb")

        def reply() -> tuple[int, bytes]:
            lines = [reader.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(reader.readline())
            return int(lines[-1][:3]), lines[-1][4:].strip()

        reply()
        for command in (
            b"EHLO client.example",
            b"MAIL FROM:<a@b.example>",
            b"RCPT TO:<c@d.example>",
            b"DATA",
        ):
            sock.sendall(command + b"\r\n")
            reply()
        sock.sendall(b"Subject: d\r\n\r\nd\r\n.\r\n")
        sent.set()
        replies.append(reply())
        replies.append(reply())


def test_workers_each_publish_with_confirms(rabbit, tmp_path):
    """--workers 2: each process connects its own confirm channel, and a
    burst of separate connections all get 250 and are in the queue."""
    rabbit_queue(rabbit.port, "workers")
    smtp_port = free_port()
    proc = start_twistd(
        tmp_path,
        "--port",
        f"tcp:{smtp_port}:interface=127.0.0.1",
        "--workers",
        "2",
        "--deliver",
        f"amqp://{rabbit.url_host}/?routing_key=workers",
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for_port(smtp_port, proc)
        for _ in range(200):
            if sum("connected to amqp" in line for line in lines) >= 2:
                break
            time.sleep(0.1)
        ids = [
            queued_id(send(smtp_port, f"Subject: {i}\r\n\r\n{i}\r\n".encode()))
            for i in range(10)
        ]
        got = rabbit_drain(rabbit.port, "workers", 10)
        assert sorted(ids) == sorted(properties.message_id for properties, _ in got)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        reader.join(5)
        proc.stdout.close()
    assert 2 == sum("connected to amqp" in line for line in lines), lines
    assert not any("Traceback" in line for line in lines), lines
