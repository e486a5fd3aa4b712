"""Issue 11: clients that stall a handshake, never read, or loop on junk commands.

In-memory tests (StringTransport + Clock) for the rules, real sockets where
the fault lives in the socket layer.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

import pytest
from pytest_twisted import inlineCallbacks
from twisted.internet import reactor, task, threads
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from zope.interface import alsoProvides

from twisted_smtpd import Limits, SMTPFactory
from twisted_smtpd._deadlines import GRANULARITY
from twisted_smtpd.handlers import MemoryHandler
from twisted_smtpd.protocol import CLOSE_GRACE
from twisted_smtpd.testing import FakeClient, TLSStringTransport, connect
from twisted_smtpd.tls import TLSPolicy

from .test_events import Recorder


def make_factory(clock: Clock, **limits: Any) -> SMTPFactory:
    return SMTPFactory(
        MemoryHandler(), hostname="mx.test", reactor=clock, limits=Limits(**limits)
    )


def _policy(certificates: Any) -> TLSPolicy:
    return TLSPolicy.from_files(str(certificates["cert"]), str(certificates["key"]))


def greeted(factory: SMTPFactory) -> FakeClient:
    client = connect(factory)
    client.replies()
    client.command(b"EHLO c.example")
    return client


class TestCloseAborts:
    """Every close ends the connection, flushed or not (items 2 and 4)."""

    def test_idle_timeout_aborts_when_the_421_is_not_taken(self) -> None:
        clock = Clock()
        client = greeted(make_factory(clock, timeout=10))
        clock.advance(10)
        assert [b"421 4.4.2 mx.test Timeout, closing connection"] == client.replies()
        assert client.transport.disconnecting
        assert not client.transport.disconnected  # the 421 gets its chance
        clock.advance(CLOSE_GRACE)
        assert client.transport.disconnected  # aborted

    def test_a_connection_that_closes_in_time_is_not_aborted(self) -> None:
        clock = Clock()
        client = greeted(make_factory(clock))
        client.command(b"QUIT")
        client.protocol.connectionLost(None)
        assert not client.transport.disconnected
        assert [] == clock.getDelayedCalls()

    def test_session_ended_timeout_is_reported(self) -> None:
        clock = Clock()
        recorder = Recorder()
        factory = SMTPFactory(
            MemoryHandler(),
            hostname="mx.test",
            reactor=clock,
            limits=Limits(timeout=10),
            events=recorder,
        )
        client = greeted(factory)
        clock.advance(10 + CLOSE_GRACE)
        client.protocol.connectionLost(None)
        assert [("timeout", 10 + CLOSE_GRACE)] == recorder.named("session_ended")


class TestHandshakeTimeout:
    """A TLS handshake that never finishes is aborted (item 2)."""

    def test_starttls_handshake_times_out(self, certificates) -> None:
        clock = Clock()
        factory = SMTPFactory(
            MemoryHandler(),
            hostname="mx.test",
            reactor=clock,
            tls=_policy(certificates),
            limits=Limits(tls_handshake_timeout=30),
        )
        client = greeted(factory)
        assert client.command(b"STARTTLS")[0].startswith(b"220 ")
        clock.advance(29)
        assert not client.transport.disconnecting
        clock.advance(1)
        assert client.transport.disconnected  # aborted: no reply can reach it
        assert [] == client.replies()

    def test_a_finished_handshake_cancels_the_deadline(self, certificates) -> None:
        clock = Clock()
        factory = SMTPFactory(
            MemoryHandler(),
            hostname="mx.test",
            reactor=clock,
            tls=_policy(certificates),
            limits=Limits(tls_handshake_timeout=30, timeout=100),
        )
        client = greeted(factory)
        client.command(b"STARTTLS")
        client.protocol.handshakeCompleted()
        clock.advance(60)
        assert not client.transport.disconnecting

    def test_implicit_tls_handshake_times_out(self) -> None:
        clock = Clock()
        factory = make_factory(clock, tls_handshake_timeout=30)
        transport = TLSStringTransport()
        alsoProvides(transport, ISSLTransport)  # an ssl: listener
        client = connect(factory, transport=transport)
        clock.advance(30)
        assert client.transport.disconnected


class TestOutputBackPressure:
    """Replies to a client that does not read stop the reading (item 3)."""

    def test_the_protocol_watches_the_transports_buffer(self) -> None:
        client = connect(make_factory(Clock()))
        assert client.transport.producer is not None
        assert client.transport.streaming

    def test_no_answers_while_the_output_is_full(self) -> None:
        client = greeted(make_factory(Clock()))
        client.transport.producer.pauseProducing()  # as a full transport does
        client.send(b"NOOP\r\nHELP\r\n")
        assert [] == client.replies()
        client.transport.producer.resumeProducing()
        replies = client.replies()
        assert replies[0] == b"250 2.0.0 OK"
        assert replies[-1].startswith(b"214 ")

    def test_a_read_stops_when_the_output_fills(self) -> None:
        """The replies of one big read are written in batches, so the
        transport's back-pressure is felt within the read."""
        client = greeted(make_factory(Clock()))
        transport = client.transport
        written = []

        def write(data: bytes) -> None:
            written.append(data)
            if len(written) == 2:
                transport.producer.pauseProducing()

        transport.write = write
        client.send(b"EHLO c.example\r\n" * 1000)
        answered = b"".join(written).count(b"250 HELP")
        assert 0 < answered < 1000
        transport.producer.resumeProducing()
        assert b"".join(written).count(b"250 HELP") == 1000

    def test_held_input_pauses_the_socket(self) -> None:
        client = greeted(make_factory(Clock()))
        client.transport.producer.pauseProducing()
        client.send(b"NOOP\r\n" * 50_000)  # 300 kB, more than the held-input bound
        assert "paused" == client.transport.producerState
        client.transport.producer.resumeProducing()
        assert "producing" == client.transport.producerState

    def test_the_idle_timer_runs_while_output_is_full(self) -> None:
        clock = Clock()
        client = greeted(make_factory(clock, timeout=10))
        client.transport.producer.pauseProducing()
        client.send(b"NOOP\r\n")
        clock.advance(10)
        assert client.transport.disconnecting
        clock.advance(CLOSE_GRACE)
        assert client.transport.disconnected


class TestJunkCommands:
    """NOOP/RSET/VRFY/HELP/BDAT 0 loops end like other errors (item 5)."""

    def test_junk_past_the_limit_counts_as_bad(self) -> None:
        client = greeted(make_factory(Clock(), max_junk_commands=5, max_bad_commands=3))
        for verb in (b"NOOP", b"RSET", b"VRFY x", b"HELP", b"NOOP"):
            assert not client.command(verb)[-1].startswith(b"421")
        assert client.command(b"NOOP") == [b"250 2.0.0 OK"]
        assert client.command(b"NOOP") == [b"250 2.0.0 OK"]
        assert client.command(b"NOOP") == [
            b"250 2.0.0 OK",
            b"421 4.7.0 mx.test Too many errors, closing connection",
        ]
        assert client.closed

    def test_default_limit_is_postfix_like(self) -> None:
        client = greeted(make_factory(Clock()))
        for _ in range(109):
            client.command(b"NOOP")
        assert not client.closed
        assert client.command(b"NOOP")[-1].startswith(b"421 4.7.0")

    def test_a_delivered_message_forgives_junk(self) -> None:
        client = greeted(make_factory(Clock(), max_junk_commands=5, max_bad_commands=2))
        for _ in range(5):
            client.command(b"NOOP")
        client.command(b"MAIL FROM:<a@example.org>")
        client.command(b"RCPT TO:<b@example.net>")
        client.command(b"DATA")
        client.send(b"Subject: t\r\n\r\nhi\r\n.\r\n")
        assert client.replies()[0].startswith(b"250 2.0.0")
        for _ in range(5):
            client.command(b"NOOP")
        assert not client.closed

    def test_empty_bdat_chunks_are_junk(self) -> None:
        client = greeted(make_factory(Clock(), max_junk_commands=3, max_bad_commands=2))
        client.command(b"MAIL FROM:<a@example.org>")
        client.command(b"RCPT TO:<b@example.net>")
        for _ in range(4):
            assert client.command(b"BDAT 0")[0].startswith(b"250 ")
        assert client.command(b"BDAT 0")[-1].startswith(b"421 4.7.0")
        assert client.closed


class TestSessionTime:
    """No loop holds a session past max_session_time (item 5)."""

    def test_an_active_session_ends_at_its_lifetime(self) -> None:
        clock = Clock()
        client = greeted(make_factory(clock, max_session_time=1000, timeout=300))
        for _ in range(9):
            clock.advance(100)
            client.command(b"EHLO c.example")
        assert not client.closed
        clock.advance(100)
        assert [
            b"421 4.4.2 mx.test Session time limit reached, closing connection"
        ] == client.replies()
        assert client.closed

    def test_a_message_being_stored_is_answered_first(self) -> None:
        from twisted.internet.defer import Deferred

        pending: Deferred = Deferred()

        class Slow:
            def handle_message(self, envelope: Any) -> Deferred:
                return pending

        clock = Clock()
        factory = SMTPFactory(
            Slow(),
            hostname="mx.test",
            reactor=clock,
            limits=Limits(max_session_time=100),
        )
        client = greeted(factory)
        client.command(b"MAIL FROM:<a@example.org>")
        client.command(b"RCPT TO:<b@example.net>")
        client.command(b"DATA")
        client.send(b"hi\r\n.\r\n")
        clock.advance(100)
        assert not client.closed
        pending.callback("Q1")
        assert client.replies() == [
            b"250 2.0.0 OK: queued as Q1",
            b"421 4.4.2 mx.test Session time limit reached, closing connection",
        ]
        assert client.closed

    def test_sessions_share_one_timer_and_each_ends_on_time(self) -> None:
        """One timer for the factory's sessions; each gets its 421 at its own
        lifetime (at most GRANULARITY late), and a closed one is forgotten."""
        clock = Clock()
        factory = make_factory(clock, max_session_time=100, timeout=300)
        first = greeted(factory)
        clock.advance(30)
        second, gone = greeted(factory), greeted(factory)
        gone.protocol.connectionLost(None)
        assert gone.protocol not in factory.session_deadlines
        lifetimes = [
            c for c in clock.getDelayedCalls() if c is factory.session_deadlines.timer
        ]
        assert 1 == len(lifetimes)
        clock.advance(70)
        assert first.closed and not second.closed
        clock.advance(29)
        assert not second.closed
        clock.advance(GRANULARITY)
        assert second.closed
        assert second.replies()[-1].startswith(b"421 4.4.2 mx.test Session time")
        for client in (first, second):
            client.protocol.connectionLost(None)
        assert factory.session_deadlines.timer is None

    def test_zero_means_no_lifetime_bound(self) -> None:
        clock = Clock()
        factory = make_factory(clock, max_session_time=0)
        client = greeted(factory)
        assert client.protocol not in factory.session_deadlines
        assert factory.session_deadlines.timer is None


# -- real sockets ------------------------------------------------------------


def _server_connections(factory: SMTPFactory) -> list:
    return list(factory.sessions)


def _flood_without_reading(port: int, total: int) -> socket.socket:
    """Connect with a tiny receive buffer, send EHLO lines, read nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(2)
    chunk = b"EHLO flood.example\r\n" * 512
    sent = 0
    try:
        while sent < total:
            sent += sock.send(chunk)
    except OSError:  # the server stopped reading: the send buffer is full
        pass
    return sock


@inlineCallbacks
def test_a_client_that_never_reads_holds_bounded_memory(listen):
    """16 MB of pipelined EHLO used to pile up ~300 MB of replies."""
    factory_kwargs = {"limits": Limits(timeout=60)}
    port = listen(MemoryHandler(), **factory_kwargs)
    sock = yield threads.deferToThread(_flood_without_reading, port, 4_000_000)
    try:
        yield task.deferLater(reactor, 0.2, lambda: None)
        (protocol,) = _server_connections(listen.factories[-1])
        transport = protocol.transport
        unsent = len(transport.dataBuffer) + transport._tempDataLen
        held = len(protocol._buffer)
        # Old code: tens of MB of EHLO replies queued in the transport.
        assert unsent < 1_000_000, unsent
        assert held < 1_000_000, held
    finally:
        sock.close()


@inlineCallbacks
def test_idle_timeout_ends_a_client_that_never_reads(listen):
    port = listen(MemoryHandler(), limits=Limits(timeout=1))
    factory = listen.factories[-1]
    sock = yield threads.deferToThread(_flood_without_reading, port, 2_000_000)
    try:
        for _ in range(200):  # idle timeout + CLOSE_GRACE, then the abort
            if not factory.sessions:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        assert not factory.sessions
    finally:
        sock.close()


def _stall_starttls(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.recv(1024)
    sock.sendall(b"EHLO stall.example\r\nSTARTTLS\r\n")
    data = b""
    while b"220 2.0.0" not in data:
        data += sock.recv(4096)
    return sock  # and never a ClientHello


def _greeting(port: int, tls: bool = False) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        sock = context.wrap_socket(sock)
    with sock:
        return sock.recv(1024)


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "ssl"])
@inlineCallbacks
def test_stalled_handshakes_free_their_slots(listen, certificates, implicit):
    """Three stalled handshakes under --max-connections 3: the fourth is served."""
    policy = TLSPolicy.from_files(str(certificates["cert"]), str(certificates["key"]))
    limits = Limits(max_connections=3, timeout=300, tls_handshake_timeout=2)
    if implicit:
        port = listen(
            MemoryHandler(), ssl_context=policy.context_factory, limits=limits
        )
        stall = lambda: socket.create_connection(("127.0.0.1", port), timeout=10)  # noqa: E731
    else:
        port = listen(MemoryHandler(), tls=policy, limits=limits)
        stall = lambda: _stall_starttls(port)  # noqa: E731
    factory = listen.factories[-1]
    stalled = []
    for _ in range(3):
        stalled.append((yield threads.deferToThread(stall)))
    try:
        started = time.monotonic()  # the server may not have accepted them yet
        while len(factory.sessions) < 3 and time.monotonic() - started < 5:
            yield task.deferLater(reactor, 0.02, lambda: None)
        assert 3 == len(factory.sessions)
        started = time.monotonic()
        while factory.sessions and time.monotonic() - started < 10:
            yield task.deferLater(reactor, 0.05, lambda: None)
        assert not factory.sessions
        greeting = yield threads.deferToThread(_greeting, port, implicit)
        assert greeting.startswith(b"220 mx.test ESMTP")
    finally:
        for sock in stalled:
            sock.close()
