"""Replies go straight to the socket when nothing is queued, and stay in order."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from twisted_smtpd import SMTPFactory
from twisted_smtpd._fastwrite import (
    can_write_directly,
    close_soon,
    send_now,
    write_now,
    write_soon,
)
from twisted_smtpd._session import Limits, Session
from twisted_smtpd.handlers import MemoryHandler
from twisted_smtpd.testing import TLSStringTransport, connect
from twisted_smtpd.tls import TLSPolicy


class _Recorder(Protocol):
    """Hands its transport to the test once connected; records the loss."""

    def __init__(self, on_connect: Deferred) -> None:
        self.on_connect = on_connect
        self.lost: list = []

    def connectionMade(self) -> None:
        self.transport.recorder = self
        self.on_connect.callback(self.transport)

    def connectionLost(self, reason=None) -> None:
        self.lost.append(reason)


def _serve_one():
    """Listen on loopback; (port, Deferred firing with the server transport)."""
    connected: Deferred = Deferred()
    port = reactor.listenTCP(
        0, Factory.forProtocol(lambda: _Recorder(connected)), interface="127.0.0.1"
    )
    return port, connected


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (or resets) the connection."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _turn():
    """A Deferred that fires after the reactor's current turn."""
    return task.deferLater(reactor, 0, lambda: None)


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = bytearray()
    while not data.endswith(marker):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def test_test_transports_keep_transport_write():
    """StringTransport and TLS-capable test transports have no socket to use."""
    assert not can_write_directly(StringTransport())
    assert not can_write_directly(TLSStringTransport())


@pytest_twisted.inlineCallbacks
def test_plain_tcp_qualifies_and_sends_at_once():
    """With this Twisted, a TCP server transport qualifies; bytes leave at the
    end of the turn, straight from the queue (no write watch)."""
    port, connected = _serve_one()
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        transport = yield connected
        assert can_write_directly(transport)
        write_soon(transport, b"220 hello\r\n")
        yield _turn()
        # Sent by then: nothing waits in Twisted's queue.
        assert not transport.dataBuffer and not transport._tempDataLen
        data = yield threads.deferToThread(_read_until, client, b"\r\n")
        assert data == b"220 hello\r\n"
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_order_kept_when_the_kernel_buffer_fills():
    """What the kernel refuses is queued, and later writes queue behind it."""
    port, connected = _serve_one()
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        transport = yield connected
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        big = bytes(range(256)) * 4096  # 1 MiB: more than the kernel takes at once
        write_soon(transport, big)  # past bufferSize: sent at once
        assert transport.dataBuffer or transport._tempDataLen  # the fallback ran
        write_soon(transport, b"250 after\r\n")
        data = yield threads.deferToThread(_read_until, client, b"250 after\r\n")
        assert data == big + b"250 after\r\n"
    finally:
        client.close()
        yield port.stopListening()


@pytest.fixture
def tls_policy(certificates) -> TLSPolicy:
    return TLSPolicy.from_files(str(certificates["cert"]), str(certificates["key"]))


@pytest_twisted.inlineCallbacks
def test_no_direct_writes_after_starttls(tls_policy):
    port, connected = _serve_one()
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        transport = yield connected
        assert can_write_directly(transport)
        transport.startTLS(tls_policy.context_factory)
        assert not can_write_directly(transport)
    finally:
        client.close()
        yield port.stopListening()


class _CountingTransport(TLSStringTransport):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[bytes] = []
        self.written_before_tls = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def startTLS(self, contextFactory, normal: bool = True) -> None:
        self.written_before_tls = self.value()
        super().startTLS(contextFactory, normal)


@pytest.fixture
def counting(memory, clock):
    factory = SMTPFactory(memory, hostname="mx.test", reactor=clock)
    transport = _CountingTransport()
    client = connect(factory, transport=transport)
    client.replies()
    transport.writes.clear()
    return client, transport


def test_pipelined_replies_leave_in_one_write(counting, memory: MemoryHandler):
    """Replies to one read are joined: one send, not one per command."""
    client, transport = counting
    client.send(
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
        b"DATA\r\nhello\r\n.\r\nNOOP\r\n"
    )
    assert len(transport.writes) == 1
    codes = [line[:4] for line in client.replies()]
    assert codes[-5:] == [b"250 ", b"250 ", b"354 ", b"250 ", b"250 "]
    assert len(memory.messages) == 1


class _CloseRecordingTransport(_CountingTransport):
    written_before_close = None

    def loseConnection(self) -> None:
        self.written_before_close = self.value()
        super().loseConnection()


def test_reply_is_written_before_the_close(memory, clock):
    """QUIT's 221 reaches the transport before loseConnection, and nothing after."""
    factory = SMTPFactory(memory, hostname="mx.test", reactor=clock)
    transport = _CloseRecordingTransport()
    client = connect(factory, transport=transport)
    client.send(b"NOOP\r\nQUIT\r\nNOOP\r\n")
    assert transport.written_before_close is not None
    assert transport.written_before_close.endswith(b"250 OK\r\n221 Bye\r\n")
    assert transport.value() == transport.written_before_close


def test_starttls_reply_is_written_before_the_handshake(tls_policy, memory, clock):
    """The 220 goes out in plaintext even when replies are being collected."""
    factory = SMTPFactory(memory, hostname="mx.test", reactor=clock, tls=tls_policy)
    transport = _CountingTransport()
    client = connect(factory, transport=transport)
    client.send(b"EHLO c\r\nSTARTTLS\r\nNOOP\r\n")
    assert transport.written_before_tls is not None
    assert transport.written_before_tls.endswith(b"220 2.0.0 Ready to start TLS\r\n")
    # The plaintext NOOP behind STARTTLS is dropped, never answered.
    assert transport.value() == transport.written_before_tls


@pytest_twisted.inlineCallbacks
def test_sessions_on_tcp_write_replies_directly(memory):
    """A real TCP session uses the direct path, and its replies are never queued."""
    factory = SMTPFactory(memory, hostname="mx.test")
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    sock = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        greeting = yield threads.deferToThread(_read_until, sock, b"\r\n")
        assert greeting.startswith(b"220 ")
        (session,) = factory.sessions
        assert session._direct_write
        sock.sendall(b"EHLO c.example\r\nNOOP\r\n")
        replies = yield threads.deferToThread(_read_until, sock, b"250 2.0.0 OK\r\n")
        assert b"250-PIPELINING" in replies
        assert not session.transport.dataBuffer and not session.transport._tempDataLen
    finally:
        sock.close()
        yield port.stopListening()


# -- write_soon: held to the end of the reactor turn, then straight to the socket


class _Producer:
    """A streaming producer that records being paused."""

    def __init__(self) -> None:
        self.paused = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest_twisted.inlineCallbacks
def test_write_soon_sends_at_the_end_of_the_turn_without_a_write_watch():
    port, connected = _serve_one()
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        transport = yield connected
        write_soon(transport, b"220 hello\r\n")
        write_soon(transport, b"250 more\r\n")
        # Held in Twisted's own queue, in order, with no write watch asked for.
        assert transport._tempDataBuffer == [b"220 hello\r\n", b"250 more\r\n"]
        assert transport not in reactor.getWriters()
        data = yield threads.deferToThread(_read_until, client, b"more\r\n")
        assert data == b"220 hello\r\n250 more\r\n"
        # Sent straight from the queue: nothing left there, no watch started.
        assert not transport.dataBuffer and not transport._tempDataLen
        assert transport not in reactor.getWriters()
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_write_soon_keeps_order_with_transport_write_and_close():
    """Bytes from transport.write meanwhile follow; loseConnection sends all first."""
    port, connected = _serve_one()
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        transport = yield connected
        write_soon(transport, b"one\r\n")
        transport.write(b"two\r\n")
        write_soon(transport, b"three\r\n")
        transport.loseConnection()
        # After loseConnection, like transport.write: sent before the close.
        write_soon(transport, b"four\r\n")
        data = yield threads.deferToThread(_read_all, client)
        assert data == b"one\r\ntwo\r\nthree\r\nfour\r\n"
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_send_now_sends_before_an_abort():
    """What must go out before abortConnection drops the connection does."""
    port, connected = _serve_one()
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        transport = yield connected
        write_soon(transport, b"421 bye\r\n")
        send_now(transport)
        assert not transport._tempDataLen
        transport.abortConnection()
        data = yield threads.deferToThread(_read_all, client)
        assert data == b"421 bye\r\n"
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_write_soon_many_connections_in_one_turn():
    """Several connections' bytes of one turn all leave, each in its order."""
    ports_and_clients = []
    try:
        transports = []
        for _ in range(3):
            port, connected = _serve_one()
            client = socket.create_connection(
                ("127.0.0.1", port.getHost().port), timeout=10
            )
            ports_and_clients.append((port, client))
            transports.append((yield connected))
        for i, transport in enumerate(transports):
            write_soon(transport, b"%d-a\r\n" % i)
        for i, transport in enumerate(transports):
            write_soon(transport, b"%d-b\r\n" % i)
        for i, (_, client) in enumerate(ports_and_clients):
            data = yield threads.deferToThread(_read_until, client, b"-b\r\n")
            assert data == b"%d-a\r\n%d-b\r\n" % (i, i)
    finally:
        for port, client in ports_and_clients:
            client.close()
            yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_write_soon_past_the_buffer_size_meets_back_pressure():
    """A client that does not read: the producer is paused, nothing is lost."""
    port, connected = _serve_one()
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        transport = yield connected
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        producer = _Producer()
        transport.registerProducer(producer, True)
        line = b"250 " + b"x" * 1020 + b"\r\n"
        count = 4 * transport.bufferSize // len(line)
        for _ in range(count):
            write_soon(transport, line)
        # Sent at once past bufferSize; the rest waits in Twisted's queue.
        assert producer.paused
        assert len(transport.dataBuffer) + transport._tempDataLen < count * len(line)
        transport.unregisterProducer()
        data = yield threads.deferToThread(_read_until, client, line * count)
        assert data == line * count
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_write_soon_before_starttls_goes_out_in_plaintext(tls_policy):
    """Held plaintext precedes the TLS layer's bytes (they share the queue)."""
    port, connected = _serve_one()
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        transport = yield connected
        write_soon(transport, b"220 go ahead\r\n")
        transport.startTLS(tls_policy.context_factory)
        assert not can_write_directly(transport)
        data = yield threads.deferToThread(_read_until, client, b"\r\n")
        assert data == b"220 go ahead\r\n"
        tls = yield threads.deferToThread(_tls_handshake, client)
        assert tls
    finally:
        client.close()
        yield port.stopListening()


def _tls_handshake(sock: socket.socket) -> str:
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    wrapped = context.wrap_socket(sock, server_hostname="mx.test")
    try:
        return str(wrapped.version())
    finally:
        wrapped.close()


# -- close_soon: loseConnection without the write watch when nothing is queued


def _read_to_eof(sock: socket.socket) -> tuple[bytes, bool]:
    """(everything read, whether it ended in an orderly EOF, not a reset)."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data), False
        if not chunk:
            return bytes(data), True
        data += chunk


@pytest_twisted.inlineCallbacks
def test_close_soon_closes_at_the_end_of_the_turn_in_order():
    port, connected = _serve_one()
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        transport = yield connected
        recorder = transport.recorder
        write_soon(transport, b"250 ok\r\n")
        send_now(transport)
        close_soon(transport)
        # No write watch, and written meanwhile still goes out before the close.
        assert transport not in reactor.getWriters()
        assert transport not in reactor.getReaders()
        write_soon(transport, b"221 bye\r\n")
        data, orderly = yield threads.deferToThread(_read_to_eof, client)
        assert (data, orderly) == (b"250 ok\r\n221 bye\r\n", True)
        yield _turn()
        assert len(recorder.lost) == 1
        assert recorder.lost[0].check(ConnectionDone)
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_close_soon_with_nothing_written_meanwhile_is_one_clean_close():
    port, connected = _serve_one()
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        transport = yield connected
        recorder = transport.recorder
        transport.loseConnection = None  # must not be needed: nothing is queued
        close_soon(transport)
        data, orderly = yield threads.deferToThread(_read_to_eof, client)
        assert (data, orderly) == (b"", True)
        yield _turn()
        assert len(recorder.lost) == 1 and recorder.lost[0].check(ConnectionDone)
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_write_now_sends_behind_what_is_held_at_once():
    """write_now: what write_soon holds, then its bytes, leave now, in order;
    the transport is not queued again for the end of the turn."""
    from twisted_smtpd._fastwrite import _outbox

    port, connected = _serve_one()
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        transport = yield connected
        outbox = _outbox(reactor)
        write_soon(transport, b"250 ok\r\n")
        assert outbox.count(transport) == 1
        write_now(transport, b"221 bye\r\n")
        assert not transport.dataBuffer and not transport._tempDataLen
        assert outbox.count(transport) == 1 and transport not in reactor.getWriters()
        write_now(transport, b"250 again\r\n")  # nothing held: not queued
        assert outbox.count(transport) == 1
        close_soon(transport)
        data, orderly = yield threads.deferToThread(_read_to_eof, client)
        assert (data, orderly) == (b"250 ok\r\n221 bye\r\n250 again\r\n", True)
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_write_now_after_close_or_tls_is_transport_write(tls_policy):
    """Not a plain open connection any more: transport.write, as write_soon."""
    port, connected = _serve_one()
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        transport = yield connected
        written: list = []
        transport.startTLS(tls_policy.context_factory)
        transport.write = written.append
        write_now(transport, b"250 encrypted\r\n")
        assert written == [b"250 encrypted\r\n"]
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_close_soon_with_bytes_queued_is_loseconnection():
    """Bytes the kernel has not taken: Twisted's own loseConnection sends them."""
    port, connected = _serve_one()
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        transport = yield connected
        transport.write(b"queued\r\n")  # in Twisted's queue, writer started
        close_soon(transport)
        assert transport.disconnecting
        data, orderly = yield threads.deferToThread(_read_to_eof, client)
        assert (data, orderly) == (b"queued\r\n", True)
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_abort_after_close_soon_loses_the_connection_once():
    port, connected = _serve_one()
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        transport = yield connected
        recorder = transport.recorder
        close_soon(transport)
        transport.abortConnection()
        yield _turn()
        yield _turn()
        assert len(recorder.lost) == 1
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_close_soon_after_starttls_is_loseconnection(tls_policy):
    """TLS closes through its own layer (close_notify), never around it."""
    port, connected = _serve_one()
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        transport = yield connected
        transport.startTLS(tls_policy.context_factory)
        closed = []
        transport.protocol.loseConnection = lambda: closed.append(True)
        close_soon(transport)
        assert closed == [True]
        assert transport in reactor.getReaders()  # not taken apart underneath
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_held_plaintext_the_kernel_defers_stays_plaintext_after_starttls(tls_policy):
    """Replies held for the end of the turn, then STARTTLS: what the kernel
    does not take at once is still sent as it was (plaintext), not through
    the TLS layer, so the client reads its 220 and can start the handshake."""
    port, connected = _serve_one()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(10)
    client.connect(("127.0.0.1", port.getHost().port))
    try:
        transport = yield connected
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        line = b"250 " + b"x" * 1020 + b"\r\n"
        for _ in range(40):  # pipelined replies the client has not read yet
            write_soon(transport, line)
        write_soon(transport, b"220 2.0.0 Ready to start TLS\r\n")
        transport.startTLS(tls_policy.context_factory)
        expected = line * 40 + b"220 2.0.0 Ready to start TLS\r\n"
        yield _turn()
        assert transport.dataBuffer or transport._tempDataLen  # kernel was full
        data = yield threads.deferToThread(_read_until, client, b"TLS\r\n")
        assert data == expected
        tls = yield threads.deferToThread(_tls_handshake, client)
        assert tls
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_close_soon_then_unread_bytes_is_aborted_after_the_grace(monkeypatch):
    """Written to after close_soon, to a client that never reads: the
    connection is aborted after the close grace, not kept open for good."""
    import twisted_smtpd._fastwrite as fastwrite

    monkeypatch.setattr(fastwrite, "CLOSE_GRACE", 0.2)
    port, connected = _serve_one()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port.getHost().port))
    try:
        transport = yield connected
        recorder = transport.recorder
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        close_soon(transport)
        transport.write(b"x" * (4 * 1024 * 1024))  # more than the kernel holds
        for _ in range(40):
            if recorder.lost:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        assert len(recorder.lost) == 1
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_send_now_kernel_full_queues_in_order():
    """send_now's own send meets a full kernel buffer (would block): the
    bytes are queued for Twisted's writer and arrive, in order, once read."""
    port, connected = _serve_one()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port.getHost().port))
    try:
        transport = yield connected
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        filler = bytearray()
        while True:  # fill the kernel's buffers behind Twisted's back
            try:
                filler += b"f" * transport.socket.send(b"f" * 4096)
            except BlockingIOError:
                break
        write_soon(transport, b"250 queued\r\n")
        send_now(transport)
        assert transport.dataBuffer or transport._tempDataLen  # kept, not lost
        write_soon(transport, b"250 after\r\n")
        data = yield threads.deferToThread(_read_until, client, b"250 after\r\n")
        assert data == bytes(filler) + b"250 queued\r\n250 after\r\n"
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_send_now_to_a_reset_connection_reports_the_loss():
    """The client reset the connection: send_now's own send fails, and the
    loss reaches the protocol as with Twisted's writer (once, no exception)."""
    import struct

    port, connected = _serve_one()
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        transport = yield connected
        recorder = transport.recorder
        transport.stopReading()  # the loss must come from the write side
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST
        for _ in range(3):  # the first send after a RST may still succeed
            write_soon(transport, b"250 nobody\r\n")
            send_now(transport)
            yield _turn()
            if recorder.lost:
                break
        for _ in range(40):
            if recorder.lost:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        assert len(recorder.lost) == 1
    finally:
        client.close()
        yield port.stopListening()


# -- the peer address: buildProtocol's, reused when it is getPeer()'s value


class _Sock:
    """A connected socket's stand-in for tcp.Server: takes every byte."""

    family = socket.AF_INET

    def setblocking(self, flag) -> None:
        pass

    def fileno(self) -> int:
        return -1

    def send(self, data) -> int:
        return len(data)

    def shutdown(self, how) -> None:
        pass

    def close(self) -> None:
        pass


def _tcp_session(factory, built, client):
    """A session on a real tcp.Server whose client is C{client}, built by
    C{factory.buildProtocol(built)}; the reactor never polls its fake fd."""
    from twisted.internet import tcp

    protocol = factory.buildProtocol(built)
    transport = tcp.Server(_Sock(), protocol, client, None, 1, MemoryReactorClock())
    protocol.makeConnection(transport)
    return protocol, transport


@pytest.mark.parametrize(
    "built",
    [
        IPv4Address("TCP", "192.0.2.7", 40000),  # as tcp.Port passes it: reused
        IPv4Address("TCP", "192.0.2.7", 1),  # another port: getPeer()
        IPv4Address("TCP", "192.0.2.8", 40000),  # another host: getPeer()
        IPv4Address("UDP", "192.0.2.7", 40000),  # another type: getPeer()
        None,  # a caller that passes no address: getPeer()
    ],
)
def test_session_peer_is_always_getpeers_value(memory, built):
    """The peer a handler sees is what transport.getPeer() gives, whether
    buildProtocol's address is reused or not."""
    protocol, transport = _tcp_session(
        SMTPFactory(memory, hostname="mx.test", reactor=task.Clock()),
        built,
        ("192.0.2.7", 40000),
    )
    peer = protocol.session.peer
    assert peer == transport.getPeer() == IPv4Address("TCP", "192.0.2.7", 40000)
    assert type(peer) is IPv4Address
    assert (peer is built) == (built == peer)  # reused only when equal


def test_session_peer_on_ipv6_is_getpeers_value(memory):
    protocol, transport = _tcp_session(
        SMTPFactory(memory, hostname="mx.test", reactor=task.Clock()),
        IPv6Address("TCP", "2001:db8::7", 40000),
        ("2001:db8::7", 40000, 0, 0),
    )
    assert protocol.session.peer == transport.getPeer()
    assert type(protocol.session.peer) is IPv6Address


def test_session_with_defaults_is_the_same_as_with_keywords():
    """Session stores only what differs from its class defaults: passing the
    defaults as keywords (as _start_session does) builds the same instance."""
    limits = Limits()
    short = Session("S1", IPv4Address("TCP", "192.0.2.7", 25), limits)
    full = Session(
        "S1",
        IPv4Address("TCP", "192.0.2.7", 25),
        limits,
        tls_info=None,
        tls_required=False,
        auth_required=False,
        lmtp=False,
    )
    assert vars(short) == vars(full)
    assert list(vars(short)) == list(vars(full))


# -- the output watch: registered once Twisted's writer is to hold bytes


class _FullSock(_Sock):
    """A socket stand-in whose kernel buffer takes C{room} more bytes."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.sent = bytearray()

    def send(self, data) -> int:
        taken = bytes(data[: self.room])
        self.room -= len(taken)
        self.sent += taken
        return len(taken)


def test_output_watch_registered_when_the_writer_takes_bytes(memory):
    """On a direct-write transport the watch is registered only when a send
    leaves bytes to Twisted's writer, and its write() then pauses the
    session's answers past the buffer size, as with the watch registered at
    connect (StringTransport sessions still register it at connect)."""
    from twisted.internet import tcp

    from twisted_smtpd.protocol import _OUTPUT_FULL

    clock = task.Clock()
    factory = SMTPFactory(
        memory,
        hostname="mx.test",
        reactor=clock,
        limits=Limits(max_junk_commands=10**6),
    )
    sock = _FullSock(room=10**6)
    protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    fd_reactor = MemoryReactorClock()
    transport = tcp.Server(sock, protocol, ("192.0.2.7", 40000), None, 1, fd_reactor)
    protocol.makeConnection(transport)
    assert protocol._direct_write
    assert transport.producer is None  # nothing held by Twisted's writer yet
    send_now(transport)  # what the end of the turn does: the 220
    protocol.dataReceived(b"EHLO c.example\r\n")
    send_now(transport)
    assert transport.producer is None and sock.sent.startswith(b"220 ")
    # The kernel buffer is full: the next replies go to Twisted's writer.
    sock.room = 0
    protocol.dataReceived(b"NOOP\r\n")
    send_now(transport)
    assert transport.producer is protocol._output_watch is not None
    assert transport.streamingProducer
    assert not protocol._waits & _OUTPUT_FULL
    # Past the buffer size, its write() pauses the watch: answers stop.
    noops = b"NOOP\r\n" * (transport.bufferSize // 10)
    protocol.dataReceived(noops)
    send_now(transport)
    assert protocol._waits & _OUTPUT_FULL
    held = len(protocol._buffer) - protocol._pos
    assert held > 0  # NOOPs not answered while the output is full
    # Drained: resumed, the held NOOPs answered, in order, nothing lost.
    sock.room = 10**8
    while transport.dataBuffer or transport._tempDataLen:
        transport.doWrite()
        send_now(transport)
    assert not protocol._waits & _OUTPUT_FULL
    assert sock.sent.count(b"250 2.0.0 OK\r\n") == 1 + noops.count(b"NOOP")
    protocol.dataReceived(b"QUIT\r\n")
    assert transport.producer is None  # unregistered at the close, as before


@pytest_twisted.inlineCallbacks
def test_output_watch_registered_before_starttls(memory, tls_policy):
    """STARTTLS on a direct-write connection registers the watch before
    startTLS (which moves a registered producer to the TLS layer): after it,
    Twisted's writer holds every reply."""
    factory = SMTPFactory(memory, hostname="mx.test", tls=tls_policy)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    sock = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        greeting = yield threads.deferToThread(_read_until, sock, b"\r\n")
        assert greeting.startswith(b"220 ")
        (session,) = factory.sessions
        assert session._direct_write and session._output_watch is None
        sock.sendall(b"EHLO c.example\r\nSTARTTLS\r\n")
        replies = yield threads.deferToThread(_read_until, sock, b"start TLS\r\n")
        assert b"250-STARTTLS" in replies
        yield _turn()
        assert not session._direct_write
        assert session._output_watch is not None
        version = yield threads.deferToThread(_tls_handshake, sock)
        assert version.startswith("TLS")
    finally:
        sock.close()
        yield port.stopListening()
