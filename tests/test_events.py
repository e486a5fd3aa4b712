"""factory.events: the protocol and factory tell a SessionEvents what happens."""

from __future__ import annotations

import smtplib
import socket
import ssl
from base64 import b64encode

import pytest
import pytest_twisted
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from twisted_smtpd import Limits, SMTPError, SMTPFactory
from twisted_smtpd._events import SessionEvents
from twisted_smtpd.auth import AuthPolicy
from twisted_smtpd.handlers import MemoryHandler
from twisted_smtpd.testing import FakeClient, connect
from twisted_smtpd.tls import TLSPolicy


class Recorder(SessionEvents):
    """Keeps every event as a tuple, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def connection_refused(self, reason):
        self.seen.append(("connection_refused", reason))

    def session_started(self):
        self.seen.append(("session_started",))

    def session_ended(self, how, seconds):
        self.seen.append(("session_ended", how, seconds))

    def reply_sent(self, code):
        self.seen.append(("reply_sent", code))

    def message_received(self, outcome, size):
        self.seen.append(("message_received", outcome, size))

    def hook_finished(self, hook, seconds, ok):
        self.seen.append(("hook_finished", hook, seconds, ok))

    def tls_handshake(self, ok):
        self.seen.append(("tls_handshake", ok))

    def auth_attempt(self, ok):
        self.seen.append(("auth_attempt", ok))

    def named(self, name: str) -> list[tuple]:
        return [event[1:] for event in self.seen if event[0] == name]


def make(handler=None, **kwargs) -> tuple[SMTPFactory, Recorder, Clock]:
    recorder, clock = Recorder(), Clock()
    factory = SMTPFactory(
        handler if handler is not None else MemoryHandler(),
        hostname="mx.test",
        reactor=clock,
        events=recorder,
        **kwargs,
    )
    return factory, recorder, clock


def send_message(client: FakeClient, body: bytes = b"hello\r\n") -> list[bytes]:
    client.command(b"EHLO c.example")
    client.command(b"MAIL FROM:<a@b.example>")
    client.command(b"RCPT TO:<c@d.example>")
    client.command(b"DATA")
    return client.command(body + b".")


class TestSession:
    def test_started_and_ended_by_quit(self) -> None:
        """A session starts with the greeting and ends with its duration."""
        factory, recorder, clock = make()
        client = connect(factory)
        assert [()] == recorder.named("session_started")
        clock.advance(5)
        client.command(b"QUIT")
        client.protocol.connectionLost(None)
        assert [("quit", 5.0)] == recorder.named("session_ended")

    @pytest.mark.parametrize(
        "how, end",
        [
            ("timeout", lambda client, clock: clock.advance(301)),
            ("lost", lambda client, clock: None),
            ("shutdown", lambda client, clock: client.protocol.factory.shutdown()),
            ("closed", lambda client, clock: [client.command(b"X") for _ in range(10)]),
        ],
    )
    def test_how_it_ended(self, how, end) -> None:
        """Timeout, lost connection, shutdown and too many errors are told apart."""
        factory, recorder, clock = make()
        client = connect(factory)
        end(client, clock)
        client.protocol.connectionLost(None)
        assert [how] == [event[0] for event in recorder.named("session_ended")]

    def test_reply_sent_once_per_reply(self) -> None:
        """Every reply is counted once, multi-line EHLO included."""
        factory, recorder, _ = make()
        client = connect(factory)
        client.command(b"EHLO c.example")
        client.command(b"NOOP")
        client.command(b"FROB")
        assert [(220,), (250,), (250,), (500,)] == recorder.named("reply_sent")


class TestRefusals:
    def test_max_connections(self) -> None:
        """A client over max_connections is refused with that reason."""
        factory, recorder, _ = make(limits=Limits(max_connections=1))
        connect(factory)
        connect(factory)
        assert [("max_connections",)] == recorder.named("connection_refused")
        assert 1 == len(recorder.named("session_started"))

    def test_max_connections_per_ip(self) -> None:
        """A client over max_connections_per_ip is refused with that reason."""
        factory, recorder, _ = make(limits=Limits(max_connections_per_ip=1))
        connect(factory)
        connect(factory)
        assert [("max_connections_per_ip",)] == recorder.named("connection_refused")

    def test_shutting_down(self) -> None:
        """A client arriving during shutdown is refused with that reason."""
        factory, recorder, _ = make()
        factory.shutdown()
        connect(factory)
        assert [("shutting_down",)] == recorder.named("connection_refused")

    def test_check_client(self) -> None:
        """A client the handler refuses is counted; no session starts."""

        class Refuse:
            def check_client(self, peer):
                raise SMTPError(554, "5.7.1", "No")

            def handle_message(self, envelope):
                pass

        factory, recorder, _ = make(Refuse())
        client = connect(factory, IPv4Address("TCP", "192.0.2.9", 1))
        client.protocol.connectionLost(None)
        assert [("check_client",)] == recorder.named("connection_refused")
        assert [] == recorder.named("session_started")
        assert [] == recorder.named("session_ended")
        assert [("check_client", 0.0, False)] == recorder.named("hook_finished")


class TestMessages:
    def test_accepted(self) -> None:
        """A stored message is accepted, with its size."""
        factory, recorder, _ = make()
        send_message(connect(factory))
        assert [("accepted", 7)] == recorder.named("message_received")

    def test_refused_and_failed(self) -> None:
        """SMTPError from the handler is refused; any other error is failed."""
        calls = []

        def handle(envelope):
            calls.append(envelope)
            if len(calls) == 1:
                raise SMTPError(550, "5.7.1", "no")
            raise OSError("disk")

        factory, recorder, _ = make(handle)
        client = connect(factory)
        send_message(client)
        send_message(client)
        assert [("refused", 7), ("failed", 7)] == recorder.named("message_received")

    def test_too_big(self) -> None:
        """A message over the size limit is too_big."""
        factory, recorder, _ = make(limits=Limits(max_message_size=3))
        send_message(connect(factory))
        assert [("too_big", 7)] == recorder.named("message_received")

    def test_aborted(self) -> None:
        """A client gone mid-BDAT aborts the message."""
        factory, recorder, _ = make()
        client = connect(factory)
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        client.command(b"RCPT TO:<c@d.example>")
        client.send(b"BDAT 4\r\nabcd")
        client.protocol.connectionLost(None)
        assert [("aborted", 4)] == recorder.named("message_received")

    def test_hooks_timed(self) -> None:
        """Each hook that ran reports how long it took and whether it accepted."""
        pending: list[Deferred] = []

        class Slow:
            def check_sender(self, envelope):
                d: Deferred = Deferred()
                pending.append(d)
                return d

            def check_recipient(self, envelope, address, options):
                if address.startswith("no@"):
                    raise SMTPError(550, "5.1.1", "No such user")

            def handle_message(self, envelope):
                pass

        factory, recorder, clock = make(Slow())
        client = connect(factory)
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        clock.advance(2)
        pending[0].callback(None)
        client.command(b"RCPT TO:<no@d.example>")
        client.command(b"RCPT TO:<c@d.example>")
        client.command(b"DATA")
        client.command(b"x\r\n.")
        assert [
            ("check_sender", 2.0, True),
            ("check_recipient", 0.0, False),
            ("check_recipient", 0.0, True),
            ("message", 0.0, True),
        ] == recorder.named("hook_finished")


class TestAuth:
    def test_attempts(self) -> None:
        """Each AUTH exchange reports success or failure."""
        users = InMemoryUsernamePasswordDatabaseDontUse()
        users.addUser(b"alice", b"secret")
        auth = AuthPolicy.from_checkers(
            [users], allow_without_tls=True, failure_delay=0
        )
        factory, recorder, _ = make(auth=auth)
        client = connect(factory)
        client.command(b"EHLO c.example")
        client.command(b"AUTH PLAIN " + b64encode(b"\0alice\0wrong"))
        client.command(b"AUTH LOGIN")
        client.command(b"*")
        client.command(b"AUTH PLAIN " + b64encode(b"\0alice\0secret"))
        assert [(False,), (False,), (True,)] == recorder.named("auth_attempt")


def _client_context(certificates) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certificates["ca"]))
    context.check_hostname = False
    return context


@pytest_twisted.inlineCallbacks
def test_tls_handshakes_over_sockets(listen, certificates):
    """A real STARTTLS handshake is ok; a client speaking plaintext to ssl: is not."""
    recorder = Recorder()
    policy = TLSPolicy.from_files(str(certificates["cert"]), str(certificates["key"]))
    starttls = listen(MemoryHandler(), tls=policy, events=recorder)
    implicit = listen(
        MemoryHandler(), ssl_context=policy.context_factory, events=recorder
    )

    def clients():
        with smtplib.SMTP("127.0.0.1", starttls) as smtp:
            smtp.starttls(context=_client_context(certificates))
            smtp.noop()
        with socket.create_connection(("127.0.0.1", implicit), timeout=10) as sock:
            sock.sendall(b"EHLO this is not TLS\r\n" * 20)
            try:
                while sock.recv(4096):
                    pass
            except OSError:
                pass

    yield threads.deferToThread(clients)
    for _ in range(200):  # the server sees the second close a moment later
        if len(recorder.named("tls_handshake")) >= 2:
            break
        yield task.deferLater(reactor, 0.01, lambda: None)
    assert [(True,), (False,)] == recorder.named("tls_handshake")


def test_unobserved_factory_has_no_events() -> None:
    """Without events= nothing is recorded and nothing fails."""
    factory = SMTPFactory(MemoryHandler(), hostname="mx.test", reactor=Clock())
    assert factory.events is None
    assert send_message(connect(factory))[0].startswith(b"250 ")


def test_client_gone_while_the_handler_stores() -> None:
    """A client lost during finish() aborts the receiver; one event, aborted."""
    pending: Deferred = Deferred()
    aborted = []

    class Receiver:
        def write(self, data):
            pass

        def finish(self):
            return pending

        def abort(self):
            aborted.append(True)

    class Streaming:
        def open_message(self, envelope):
            return Receiver()

    factory, recorder, _ = make(Streaming())
    client = connect(factory)
    send_message(client)
    client.protocol.connectionLost(None)
    assert [True] == aborted
    pending.callback("Q1")
    assert [("aborted", 7)] == recorder.named("message_received")
