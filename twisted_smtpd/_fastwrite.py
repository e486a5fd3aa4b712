# -*- test-case-name: tests.test_fastwrite -*-
"""
Send a reply straight to the socket when the transport has nothing queued.

C{transport.write} on a TCP connection only queues the bytes and asks the
reactor to watch for writability: every reply then costs an C{epoll_ctl} to
add the watch, one more turn of the reactor loop, the C{send}, and an
C{epoll_ctl} to remove the watch.  SMTP is lock-step, so almost every reply
meets an empty send buffer and could go out at once, falling back to
Twisted's writer for whatever the kernel does not take, and whenever anything
is already queued, so the byte order and Twisted's own buffering and
producer logic are unchanged.

L{write_soon} does that one step later: the bytes wait in the transport's own
queue until the end of the reactor turn, and then every connection's replies
of that turn are sent back to back.  On loopback (benchmarks, a proxy or a
filter on the same host) a C{send} also runs the receiving side and wakes the
client; sent one at a time between the Python work of the other connections,
nearly every reply wakes a client that had gone back to sleep, which cost
more CPU than the C{send} itself (about 40 us per one-message connection).
Sent together, the later wake-ups find the client already awake, as with
Twisted's own write path, but with no C{epoll_ctl} and no extra turn.  The
bytes sit in C{_tempDataBuffer}, where C{transport.write} appends too, so
anything written meanwhile (by Twisted's TLS layer after C{startTLS}, by a
subclass) follows them in order, C{loseConnection} sends them before it
closes, and C{dataBuffer}/C{_tempDataLen} still tell what is unsent.  What is
about to drop the connection (C{abortConnection}) must call L{send_now}
first; past C{bufferSize} bytes a transport is sent at once, so a client that
does not read meets Twisted's back-pressure as before.

Only a plain (non-TLS) L{twisted.internet.tcp.Connection} qualifies, and only
if it has the attributes this relies on; anything else (TLS, wrappers, test
transports, another Twisted) fails L{can_write_directly} and the caller uses
C{transport.write}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.main import CONNECTION_DONE
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "can_write_directly",
    "close_soon",
    "send_now",
    "write_now",
    "write_soon",
]

_log = Logger(namespace="twisted_smtpd.protocol")

#: seconds a closing connection's last bytes may wait for the client to
#: read them before the connection is aborted
CLOSE_GRACE = 5.0

# What FileDescriptor.write/doWrite keep their queue and state in.
_REQUIRED = (
    "dataBuffer",
    "_tempDataBuffer",
    "_tempDataLen",
    "_writeDisconnected",
    "writeSomeData",
    "bufferSize",
    "reactor",
    "producer",
    "disconnected",
    "stopReading",
    "connectionLost",
)


#: what send_now inlines, and up to how many bytes (a plain TCP connection's)
_TCP_WRITE_SOME = tcp.Connection.writeSomeData
_SEND_LIMIT = tcp.Connection.SEND_LIMIT

#: transport classes checked by can_write_directly: whether they qualify
_qualified: dict[type, bool] = {}


def can_write_directly(transport: Any) -> bool:
    """Whether L{write_soon} and L{close_soon} may be used for C{transport}."""
    cls = type(transport)
    qualifies = _qualified.get(cls)
    if qualifies is None:
        # Per class, once: the attributes are the class's or set by its
        # __init__ (FileDescriptor's), so one instance answers for all.
        qualifies = isinstance(transport, tcp.Connection) and all(
            hasattr(transport, name) for name in _REQUIRED
        )
        if len(_qualified) < 64:
            _qualified[cls] = qualifies
    return qualifies and not getattr(transport, "TLS", True)


def write_soon(transport: Any, data: bytes) -> None:
    """C{transport.write(data)}, sent straight to the socket at the end of this
    reactor turn together with the other connections' output.

    Only for a transport L{can_write_directly} accepted.  Falls back to
    C{transport.write} when the transport is closing, TLS, or has bytes in
    Twisted's own writer.
    """
    t = transport
    if (
        t.connected
        and not t.disconnecting
        and not t.TLS
        and not t.dataBuffer
        and not t._writeDisconnected
    ):
        queued = t._tempDataLen
        if not queued:
            # (_outbox and its schedule, inline: once per reply write)
            outbox = _outboxes.get(t.reactor)
            if outbox is None:
                outbox = _outbox(t.reactor)
            outbox.append(t)
            if not outbox.scheduled:
                outbox.schedule()
        # Behind whatever transport.write queued: the order stays.
        t._tempDataBuffer.append(data)
        queued += len(data)
        t._tempDataLen = queued
        if queued >= t.bufferSize:
            send_now(t)  # a client that does not read meets back-pressure
        return
    _to_writer(t)
    t.write(data)


def _to_writer(transport: Any) -> None:
    """Twisted's writer is about to take bytes: the protocol's output watch
    (a producer, registered only now) must be there for its write() to pause."""
    watch = getattr(transport.protocol, "_watch_output", None)
    if watch is not None:
        watch()


def send_now(transport: Any) -> None:
    """Send what L{write_soon} holds for C{transport} now (before an abort).

    What the kernel does not take goes to C{transport.write}, which keeps it
    and watches for writability; with nothing held, this does nothing.
    """
    t = transport
    if t.dataBuffer or not t._tempDataLen or not t.connected:
        # Twisted's writer owns the queue (it was started by transport.write),
        # or there is nothing to send, or nobody to send it to.
        return
    queued = t._tempDataBuffer
    data = queued[0] if len(queued) == 1 else b"".join(queued)
    if type(t).writeSomeData is _TCP_WRITE_SOME and len(data) <= _SEND_LIMIT:
        # tcp.Connection.writeSomeData, inline (once per connection and turn):
        # without its memoryview and retry loop (Python retries EINTR
        # itself).  Would block, no buffers or lost: queued below, where
        # Twisted's writer sends it or finds the loss, as after its 0 or
        # CONNECTION_LOST.
        try:
            sent = t.socket.send(data)
        except OSError:
            sent = 0
    else:
        sent = t.writeSomeData(data)  # if it raises, the bytes are still queued
    t._tempDataBuffer = []
    t._tempDataLen = 0
    if isinstance(sent, int) and sent > 0:
        if sent == len(data):
            return
        data = data[sent:]
    # 0 (would block) or a lost connection: queue it; the reactor sends it
    # or reports the loss as usual.  These are wire bytes already: after
    # startTLS, transport.write would encrypt the plaintext 220 that
    # precedes the handshake.
    _to_writer(t)
    FileDescriptor.write(t, data)


def write_now(transport: Any, data: bytes) -> None:
    """L{write_soon} then L{send_now}, in one step: the last reply before a
    close is sent at once, so the transport is not queued for the end of
    the turn (where there would be nothing left to send)."""
    t = transport
    if (
        t.connected
        and not t.disconnecting
        and not t.TLS
        and not t.dataBuffer
        and not t._writeDisconnected
    ):
        t._tempDataBuffer.append(data)  # behind anything held: the order stays
        t._tempDataLen += len(data)
        send_now(t)
        return
    _to_writer(t)
    t.write(data)


def close_soon(transport: Any) -> None:
    """C{transport.loseConnection()} once everything written is sent.

    Only for a transport L{can_write_directly} accepted.  With nothing
    queued (the usual case after QUIT: the 221 went out with L{send_now}),
    the connection is closed at the end of this reactor turn, in Twisted's
    own way (C{removeReader}/C{removeWriter}, then C{connectionLost} with
    C{ConnectionDone}: shutdown and close), instead of through
    C{loseConnection}'s write watch, which costs two C{epoll_ctl}, one more
    turn and an empty C{send} per connection.  Anything written meanwhile is
    sent first, as with C{loseConnection}; a TLS transport always takes
    C{loseConnection} (its close_notify).
    """
    t = transport
    if (
        not t.connected
        or t.disconnecting
        or t.TLS  # TLS closes with its close_notify first
        or t.dataBuffer
        or t._tempDataLen
        or t._writeDisconnected
        or t.producer is not None
    ):
        t.loseConnection()
        return
    t.stopReading()
    t.disconnecting = True  # what loseConnection sets: later writes queue
    _outbox(t.reactor).close_later(t)


def _close_now(transport: Any) -> None:
    t = transport
    if t.disconnected or not t.connected or getattr(t, "_aborting", False):
        return  # gone, or aborted, meanwhile
    if t.dataBuffer or t._tempDataLen or t.producer is not None:
        # Written to meanwhile: Twisted's writer sends it, then closes
        # (the transport is disconnecting), as after loseConnection; a client
        # that never reads it is aborted after the same grace.
        t.startWriting()
        t.reactor.callLater(CLOSE_GRACE, _abort_if_open, t)
        return
    reactor = t.reactor
    reactor.removeReader(t)
    reactor.removeWriter(t)
    t.connectionLost(_CONNECTION_DONE)


#: One failure for every connection closed here, as the reactor shares one
#: per reason (PosixReactorBase._disconnectSelectable): building a Failure
#: and its parents for each costs ~1.6 us.
_CONNECTION_DONE = Failure(CONNECTION_DONE)


def _abort_if_open(transport: Any) -> None:
    if transport.connected and not transport.disconnected:
        transport.abortConnection()


class _Outbox(list[Any]):
    """The transports holding L{write_soon} output, sent once per reactor turn,
    and those L{close_soon} closes after that."""

    __slots__ = ("reactor", "scheduled", "closing")

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.scheduled = False
        self.closing: list[Any] = []

    def close_later(self, transport: Any) -> None:
        self.closing.append(transport)
        self.schedule()

    def schedule(self) -> None:
        """Send (and close) at the end of this reactor turn.

        L{write_soon} appends its transport itself (C{list.append}) and
        calls this only when nothing is scheduled yet.
        """
        if not self.scheduled:
            self.scheduled = True
            # Runs once this turn's events are handled, before the next poll.
            self.reactor.callLater(0, self.send)

    def send(self) -> None:
        self.scheduled = False
        transports = self[:]
        del self[:]
        for transport in transports:
            try:
                send_now(transport)
            except Exception:
                # Never strand the bytes: Twisted's writer sends them.
                _log.failure("smtpd: sending a reply failed")
                _to_writer(transport)
                transport.startWriting()
        closing, self.closing = self.closing, []
        for transport in closing:
            try:
                _close_now(transport)
            except Exception:
                _log.failure("smtpd: closing a connection failed")


_outboxes: dict[Any, _Outbox] = {}


def _outbox(reactor: Any) -> _Outbox:
    outbox = _outboxes.get(reactor)
    if outbox is None:
        outbox = _outboxes[reactor] = _Outbox(reactor)
    return outbox
