"""What every broker target shares: ids, the 250/451 rule, the --spool."""

from __future__ import annotations

import os
import re

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater

from twisted_smtpd import SMTPError
from twisted_smtpd._session import Envelope
from twisted_smtpd.deliver._broker import (
    BrokerHandler,
    EngineRefused,
    EngineUnavailable,
    OutboundMessage,
    new_message_id,
)
from twisted_smtpd.deliver.spool import Spool

from .helpers import ROOT, twistd_start_error


def test_message_id_shape_and_uniqueness():
    """26 Crockford base32 characters, distinct, ordered by their time."""
    ids = [new_message_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", i) for i in ids)
    assert new_message_id(1_000.000) < new_message_id(1_000.001)
    assert new_message_id(0).startswith("0000000000")


def envelope(content: bytes = b"Subject: x\r\n\r\nx\r\n") -> Envelope:
    env = Envelope(
        session_id="S1",
        peer=None,
        helo="client.example",
        esmtp=True,
        tls=None,
        auth=None,
        mail_from="a@b.example",
        rcpt_tos=["c@d.example", "\udcffbad@d.example"],
        content=content,
        size=len(content),
    )
    env.received_header = b"Received: from client.example\r\n"
    return env


def test_outbound_message_round_trips_through_bytes():
    message = OutboundMessage.from_envelope(envelope(b"a\r\n\r\nline\nlone\r\n"))
    again = OutboundMessage.from_bytes(message.to_bytes())
    assert message == again
    assert again.body == b"Received: from client.example\r\na\r\n\r\nline\nlone\r\n"
    assert ["c@d.example", "\ufffdbad@d.example"] == again.envelope["rcpt_to"]
    assert (
        '["c@d.example", "\\ufffdbad@d.example"]' == message.string_fields()["rcpt_to"]
    )
    assert "tls" not in message.string_fields()


class FakePublisher:
    """Answers each publish with what the test queued up (default: ack)."""

    name = "fake://engine"

    def __init__(self, max_size: int = 0) -> None:
        self.max_size = max_size
        self.answers: list = []
        self.published: list[OutboundMessage] = []
        self.up = True

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def publish(self, message: OutboundMessage) -> Deferred:
        if not self.up:
            return fail(EngineUnavailable("down"))
        self.published.append(message)
        if self.answers:
            return self.answers.pop(0)
        return succeed(None)


def test_250_names_the_id_the_engine_got():
    publisher = FakePublisher()
    handler = BrokerHandler(publisher, timeout=5, reactor=Clock())
    results: list = []
    handler.handle_message(envelope()).addBoth(results.append)
    assert [publisher.published[0].message_id] == results


@pytest.mark.parametrize(
    "answer, reply",
    [
        (EngineRefused("nack"), (451, "4.3.0")),
        (EngineUnavailable("closed"), (451, "4.4.1")),
        (RuntimeError("bug"), (451, "4.4.1")),
    ],
)
def test_engine_failure_is_451(answer, reply):
    publisher = FakePublisher()
    publisher.answers.append(fail(answer))
    handler = BrokerHandler(publisher, timeout=5, reactor=Clock())
    results: list = []
    handler.handle_message(envelope()).addBoth(results.append)
    assert reply == (results[0].value.reply.code, results[0].value.reply.enhanced)


def test_no_ack_in_time_is_451():
    clock = Clock()
    publisher = FakePublisher()
    publisher.answers.append(Deferred())
    handler = BrokerHandler(publisher, timeout=5, reactor=clock)
    results: list = []
    handler.handle_message(envelope()).addBoth(results.append)
    clock.advance(4.9)
    assert [] == results
    clock.advance(0.2)
    assert (451, "4.4.1") == (
        results[0].value.reply.code,
        results[0].value.reply.enhanced,
    )


def test_too_big_for_the_engine_is_552():
    handler = BrokerHandler(FakePublisher(max_size=40), timeout=5, reactor=Clock())
    results: list = []
    handler.handle_message(envelope(b"x" * 100)).addBoth(results.append)
    assert (552, "5.3.4") == (
        results[0].value.reply.code,
        results[0].value.reply.enhanced,
    )
    too_big = envelope()
    too_big.mail_options = {"SIZE": "41"}
    with pytest.raises(SMTPError):
        handler.check_sender(too_big)
    fits = envelope()
    fits.mail_options = {"SIZE": "40"}
    handler.check_sender(fits)


def spooled(spool: Spool) -> list[str]:
    return sorted(os.listdir(os.path.join(spool.path, "queue")))


def wait_until(condition, seconds: float = 10) -> Deferred:
    """Poll C{condition} on the reactor (threads do the spool's disk work)."""

    async def poll():
        for _ in range(int(seconds / 0.01)):
            if condition():
                return
            await deferLater(reactor, 0.01)
        raise AssertionError("condition not met in time")

    return Deferred.fromCoroutine(poll())


@pytest.fixture
def spool_with(tmp_path):
    made = []

    def make(publisher):
        handler = BrokerHandler(publisher, timeout=5, reactor=reactor)
        spool = Spool(str(tmp_path / "spool"), reactor=reactor, retry_initial=0.01)
        spool.attach(handler.publish, publisher.name)
        spool.start()
        handler.spool = spool
        made.append(spool)
        return handler, spool

    yield make
    for spool in made:
        spool.close()


@pytest_twisted.inlineCallbacks
def test_spool_takes_messages_while_down_and_forwards_in_order(spool_with):
    publisher = FakePublisher()
    publisher.up = False
    handler, spool = spool_with(publisher)
    ids = []
    for i in range(3):
        ids.append((yield handler.handle_message(envelope(f"{i}\r\n".encode()))))
    assert 3 == len(spooled(spool)) and [] == publisher.published
    assert all(message_id in name for message_id, name in zip(ids, spooled(spool)))
    publisher.up = True
    yield wait_until(lambda: spool.pending == 0)
    assert ids == [m.message_id for m in publisher.published]
    assert [f"{i}\r\n".encode() for i in range(3)] == [
        m.body[-3:] for m in publisher.published
    ]
    assert [] == spooled(spool)
    assert 3 == spool.forwarded


@pytest_twisted.inlineCallbacks
def test_spool_keeps_order_new_mail_waits_behind_the_backlog(spool_with):
    """With a backlog, a new message joins its end even if the engine is up."""
    publisher = FakePublisher()
    hung: Deferred = Deferred()
    # the direct publish is refused; the forwarder's first retry hangs
    publisher.answers += [fail(EngineRefused("nack")), hung]
    handler, spool = spool_with(publisher)
    first = yield handler.handle_message(envelope(b"1\r\n"))
    yield wait_until(lambda: len(publisher.published) == 2)
    second = yield handler.handle_message(envelope(b"2\r\n"))
    assert 2 == len(spooled(spool))
    assert 2 == len(publisher.published)  # not published past the backlog
    hung.callback(None)
    yield wait_until(lambda: spool.pending == 0)
    assert [first, first, second] == [m.message_id for m in publisher.published]


@pytest_twisted.inlineCallbacks
def test_spool_forwards_in_batches_and_retries_what_was_refused(spool_with):
    """At most C{batch} publishes wait for acks at once; a refused message is
    sent again (same id) while the acknowledged ones are not."""
    publisher = FakePublisher()
    publisher.up = False
    handler, spool = spool_with(publisher)
    spool.batch = 2
    ids = []
    for i in range(3):
        ids.append((yield handler.handle_message(envelope(b"%d\r\n" % i))))
    first, second = Deferred(), Deferred()
    publisher.answers += [first, second, fail(EngineRefused("nack"))]
    publisher.up = True
    spool._delay = 0.01  # the first retry (the engine was down) is short
    yield wait_until(lambda: len(publisher.published) == 2)
    assert ids[:2] == [m.message_id for m in publisher.published]
    first.callback(None)
    second.callback(None)
    yield wait_until(lambda: spool.pending == 0)
    # the third was refused once, then sent again
    assert ids + [ids[2]] == [m.message_id for m in publisher.published]
    assert 3 == spool.forwarded and [] == spooled(spool)


@pytest_twisted.inlineCallbacks
def test_spool_after_restart_forwards_what_was_left_and_drops_tmp(tmp_path):
    publisher = FakePublisher()
    publisher.up = False
    handler = BrokerHandler(publisher, timeout=5, reactor=reactor)
    spool = Spool(str(tmp_path / "spool"), reactor=reactor, retry_initial=0.01)
    spool.attach(handler.publish, publisher.name)
    handler.spool = spool
    ids = []
    for i in range(2):
        ids.append((yield handler.handle_message(envelope(b"%d\r\n" % i))))
    with pytest.raises(ValueError, match="in use by another process"):
        Spool(str(tmp_path / "spool"), reactor=reactor)
    spool.close()
    (tmp_path / "spool" / "tmp" / "000000000009-HALFWRITTEN.msg").write_bytes(b"{")
    publisher.up = True
    again = Spool(str(tmp_path / "spool"), reactor=reactor, retry_initial=0.01)
    try:
        assert [] == os.listdir(tmp_path / "spool" / "tmp")
        assert 2 == again.pending
        again.attach(handler.publish, publisher.name)
        again.start()
        yield wait_until(lambda: again.pending == 0)
        assert ids == [m.message_id for m in publisher.published]
        # numbering continues after the files left behind
        handler.spool = again
        publisher.up = False
        yield handler.handle_message(envelope())
        assert spooled(again)[0].startswith("000000000003-")
    finally:
        again.close()


@pytest_twisted.inlineCallbacks
def test_unreadable_spool_file_is_moved_aside(tmp_path):
    queue = tmp_path / "spool" / "queue"
    queue.mkdir(parents=True)
    (queue / "000000000001-BROKEN.msg").write_bytes(b"not json\n")
    publisher = FakePublisher()
    handler = BrokerHandler(publisher, timeout=5, reactor=reactor)
    spool = Spool(str(tmp_path / "spool"), reactor=reactor)
    spool.attach(handler.publish, publisher.name)
    spool.start()
    try:
        yield wait_until(lambda: spool.pending == 0)
        assert ["000000000001-BROKEN.msg"] == os.listdir(tmp_path / "spool" / "bad")
        assert [] == publisher.published
    finally:
        spool.close()


def test_spool_directory_that_cannot_be_made(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot use --spool"):
        Spool(str(tmp_path / "file" / "spool"), reactor=reactor)


def test_core_and_broker_modules_import_without_the_extras():
    """pika, redis and nats-py are extras: nothing imports them up front."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('pika', 'redis', 'nats'): sys.modules[name] = None\n"
        "import twisted_smtpd, twisted_smtpd.tap\n"
        "import twisted_smtpd.deliver.amqp, twisted_smtpd.deliver.redis\n"
        "import twisted_smtpd.deliver.nats, twisted_smtpd.deliver.spool\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize(
    "target, expected",
    [
        ("amqp://127.0.0.1/", "needs routing_key=QUEUE"),
        ("redis://127.0.0.1/0", "needs stream=NAME"),
        ("nats://127.0.0.1", "needs subject=SUBJECT"),
    ],
)
def test_twistd_bad_broker_target_one_line(tmp_path, target, expected):
    status, lines = twistd_start_error(tmp_path, "--deliver", target)
    assert 0 != status
    assert any(expected in line for line in lines), lines
    assert not any("Traceback" in line for line in lines), lines


@pytest.mark.parametrize(
    "args",
    [
        ["--spool", "spool"],
        ["--deliver", "lmtp:tcp:127.0.0.1:24", "--spool", "spool"],
    ],
)
def test_twistd_spool_without_a_broker_target_one_line(tmp_path, args):
    """--spool that would be silently ignored stops start-up instead."""
    status, lines = twistd_start_error(tmp_path, *args)
    assert 0 != status
    assert any("--spool is for --deliver amqp://" in line for line in lines), lines


def test_twistd_spool_with_workers_one_line(tmp_path):
    """Each process needs a spool of its own: --workers 2 --spool is refused."""
    status, lines = twistd_start_error(
        tmp_path,
        "--workers",
        "2",
        "--deliver",
        "amqp://127.0.0.1/?routing_key=q",
        "--spool",
        str(tmp_path / "spool"),
    )
    assert 0 != status
    assert any("--spool needs one process per spool directory" in x for x in lines)


def test_amqp_reconnect_backs_off_and_caps():
    """Each failed connection attempt doubles the wait, up to retry_max."""
    from twisted.internet.defer import fail as failed

    from twisted_smtpd.deliver.amqp import AMQPPublisher

    class Refusing:
        attempts = 0

        def connect(self, factory):
            Refusing.attempts += 1
            return failed(ConnectionRefusedError())

    clock = Clock()
    publisher = AMQPPublisher.from_url("amqp://127.0.0.1/?routing_key=q", reactor=clock)
    publisher._endpoint = Refusing()
    publisher.start()
    waits = []
    for _ in range(9):
        waits.append(clock.getDelayedCalls()[0].getTime() - clock.seconds())
        clock.advance(waits[-1])
    assert [0.5, 1, 2, 4, 8, 16, 30, 30, 30] == waits
    assert 10 == Refusing.attempts
    publisher.stop()
    assert [] == clock.getDelayedCalls()
