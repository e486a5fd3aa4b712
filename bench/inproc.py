"""Python cost per message without sockets: every read fed to dataReceived.

    python bench/inproc.py [--messages N] [--servers ts,ts_quiet,tm,floor] [--log]

For each server and each shape it builds a protocol on a StringTransport and
feeds it the reads a client would send, then prints the CPU time
(``time.process_time``) per message:

* ``conn``: a new connection per message (greeting, HELO, MAIL, RCPT, DATA,
  body, QUIT, connection lost), one command per read;
* ``session``: one connection, one command per read (lock-step);
* ``pipelined``: one connection, one read per message
  (``<body> . MAIL RCPT DATA``);
* ``conn_tcp``: ``conn`` on the real transport class, as the reactor drives
  it: a ``tcp.Server`` (on a stand-in socket that takes every byte: no system
  calls), each read through ``doRead`` under ``callWithLogger``, then the
  reactor's timed calls (``_fastwrite``'s end-of-turn send and close) and
  writes, timers on the reactor's heap instead of a ``Clock``; twisted_smtpd
  as ``twistd smtpd`` runs it, with reverse DNS answered from its cache;
* ``conn_tcp20``: the same with 20 connections at a time (as ``smtp-source
  -s 20``), in lock-step: each reads its next command, then one reactor turn
  for all (a busy server's poll reports many sockets at once).

With ``--log`` the events go through a text observer writing to os.devnull
(the bench servers' ``devnull_log.observer``, as twistd sets it up);
with ``--fastlog`` through ``twisted_smtpd.fastlog`` to os.devnull; with
neither to no observer at all.  This measures only the Python above the transport: the
syscalls and the reactor are not in it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import tcp  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.base import ReactorBase  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.logger import globalLogBeginner  # noqa: E402
from twisted.python import log  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

BODY = b"Subject: x\r\n\r\n" + b"x" * 998 + b"\r\n"
HELO = b"HELO client.example\r\n"
MAIL = b"MAIL FROM:<a@example.org>\r\n"
RCPT = b"RCPT TO:<b@example.org>\r\n"
DATA = b"DATA\r\n"
END = BODY + b".\r\n"
QUIT = b"QUIT\r\n"


def _ts(quiet: bool, reactor: Any = None) -> Callable[[], Any]:
    from twisted.internet.task import Clock

    from twisted_smtpd import SMTPFactory
    from twisted_smtpd.handlers import discard

    rdns = None
    if reactor is None:
        reactor = Clock()
    else:  # conn_tcp: as twistd smtpd runs, the client's name in the cache
        from twisted_smtpd.rdns import ReverseDNS

        rdns = ReverseDNS(resolver=object(), reactor=reactor)
        rdns._store("127.0.0.1", "localhost", 3600.0)
    factory = SMTPFactory(
        discard,
        hostname="bench.local",
        quiet=quiet,
        reactor=reactor,
        reverse_dns=rdns,
    )
    # The conn_tcp shapes' client address, as a tcp.Port passes it.
    return lambda: factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))


def _tm() -> Callable[[], Any]:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "servers"))
    from twisted_mail_server import AcceptAll, ESMTPFactory

    factory = ESMTPFactory(AcceptAll())
    # The conn_tcp shapes' client address, as a tcp.Port passes it.
    return lambda: factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))


def _floor() -> Callable[[], Any]:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "servers"))
    from floor_server import Floor

    return Floor


def _connect(build: Callable[[], Any]) -> tuple[Any, StringTransport]:
    proto = build()
    transport = StringTransport(
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        hostAddress=IPv4Address("TCP", "127.0.0.1", 25),
    )
    proto.makeConnection(transport)
    return proto, transport


def run_conn(build: Callable[[], Any], n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        proto, transport = _connect(build)
        for chunk in (HELO, MAIL, RCPT, DATA, END, QUIT):
            proto.dataReceived(chunk)
        transport.clear()
        proto.connectionLost(None)
    return time.process_time() - start


class _Socket:
    """A connected socket that takes every byte sent and returns C{data} once."""

    data = b""

    def setblocking(self, flag: bool) -> None:
        pass

    def fileno(self) -> int:
        return -1

    def recv(self, size: int) -> bytes:
        data, self.data = self.data, b""
        return data

    def send(self, data: Any) -> int:
        return len(data)

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        pass


class _LoopReactor(ReactorBase):
    """Enough reactor for a tcp.Server without a socket, turned by hand.

    Timed calls are the reactor's own (a heap); readers and writers are
    sets; L{turn} does what the epoll reactor does after a read: the calls
    due, then C{doWrite} for the transports that want to write.
    """

    def __init__(self) -> None:
        super().__init__()
        self.readers: set[Any] = set()
        self.writers: set[Any] = set()

    def installWaker(self) -> None:
        pass

    def addReader(self, reader: Any) -> None:
        self.readers.add(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.discard(reader)

    def addWriter(self, writer: Any) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer: Any) -> None:
        self.writers.discard(writer)

    def read(self, transport: Any, data: bytes) -> None:
        transport.socket.data = data
        self._done(transport, log.callWithLogger(transport, transport.doRead))

    def turn(self) -> None:
        self.runUntilCurrent()
        for writer in list(self.writers):
            self._done(writer, log.callWithLogger(writer, writer.doWrite))

    _LOST = {type(e): Failure(e) for e in (tcp.main.CONNECTION_DONE,)}

    def _done(self, selectable: Any, why: Any) -> None:
        if why:  # as PosixReactorBase._disconnectSelectable, one failure each
            self.removeReader(selectable)
            self.removeWriter(selectable)
            selectable.connectionLost(self._LOST.get(type(why)) or Failure(why))


def run_conn_tcp(
    build: Callable[[Any], Callable[[], Any]], n: int, concurrency: int = 1
) -> float:
    """conn on tcp.Server transports, C{concurrency} connections at a time
    in lock-step: each reads its next command, then one reactor turn."""
    reactor = _LoopReactor()
    make = build(reactor)
    start = time.process_time()
    for first in range(0, n, concurrency):
        transports = []
        for i in range(first, min(n, first + concurrency)):
            proto = make()
            transport = tcp.Server(
                _Socket(), proto, ("127.0.0.1", 40000), None, i, reactor
            )
            proto.makeConnection(transport)
            transports.append(transport)
        reactor.turn()
        for chunk in (HELO, MAIL, RCPT, DATA, END, QUIT):
            for transport in transports:
                reactor.read(transport, chunk)
            reactor.turn()
        if not all(transport.disconnected for transport in transports):
            reactor.turn()
        assert all(transport.disconnected for transport in transports)
    return time.process_time() - start


def run_conn_tcp20(build: Callable[[Any], Callable[[], Any]], n: int) -> float:
    return run_conn_tcp(build, n, 20)


def run_session(build: Callable[[], Any], n: int) -> float:
    proto, transport = _connect(build)
    proto.dataReceived(HELO)
    start = time.process_time()
    for i in range(n):
        for chunk in (MAIL, RCPT, DATA, END):
            proto.dataReceived(chunk)
        if i % 64 == 0:
            transport.clear()
    spent = time.process_time() - start
    assert b"250" in transport.value() or n % 64 == 1
    return spent


def run_pipelined(build: Callable[[], Any], n: int) -> float:
    proto, transport = _connect(build)
    proto.dataReceived(HELO + MAIL + RCPT + DATA)
    chunk = END + MAIL + RCPT + DATA
    start = time.process_time()
    for i in range(n):
        proto.dataReceived(chunk)
        if i % 64 == 0:
            transport.clear()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--servers", default="ts,ts_quiet,tm,floor")
    parser.add_argument("--shapes", default="conn,session,pipelined")
    parser.add_argument("--log", action="store_true", help="text observer to devnull")
    parser.add_argument("--fastlog", action="store_true", help="fastlog to devnull")
    args = parser.parse_args()
    if args.log or args.fastlog:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "servers"))
        from devnull_log import fast_observer, observer

        chosen = fast_observer if args.fastlog else observer
        globalLogBeginner.beginLoggingTo([chosen()], redirectStandardIO=False)
    else:
        globalLogBeginner.beginLoggingTo([], redirectStandardIO=False)
    builders = {
        "ts": lambda: _ts(False),
        "ts_quiet": lambda: _ts(True),
        "tm": _tm,
        "floor": _floor,
    }
    # conn_tcp builds each server's protocols for its own reactor
    tcp_builders = {
        "ts": lambda: lambda reactor: _ts(False, reactor),
        "ts_quiet": lambda: lambda reactor: _ts(True, reactor),
        "tm": lambda: lambda reactor: _tm(),
        "floor": lambda: lambda reactor: _floor(),
    }
    shapes = {
        "conn": run_conn,
        "session": run_session,
        "pipelined": run_pipelined,
        "conn_tcp": run_conn_tcp,
        "conn_tcp20": run_conn_tcp20,
    }
    servers = args.servers.split(",")
    print("us/message  " + "  ".join(f"{s:>9}" for s in servers))
    for shape in args.shapes.split(","):
        row = []
        for name in servers:
            on_tcp = shape.startswith("conn_tcp")
            build = (tcp_builders if on_tcp else builders)[name]()
            shapes[shape](build, min(2000, args.messages))  # warm up
            row.append(shapes[shape](build, args.messages) / args.messages * 1e6)
        print(f"{shape:<10}  " + "  ".join(f"{v:9.1f}" for v in row))


if __name__ == "__main__":
    main()
