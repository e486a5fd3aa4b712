"""Python cost per message without sockets: every read fed to dataReceived.

    python bench/inproc.py [--messages N] [--servers ts,ts_quiet,tm,floor] [--log]

For each server and each shape it builds a protocol on a StringTransport and
feeds it the reads a client would send, then prints the CPU time
(``time.process_time``) per message:

* ``conn``: a new connection per message (greeting, HELO, MAIL, RCPT, DATA,
  body, QUIT, connection lost), one command per read;
* ``session``: one connection, one command per read (lock-step);
* ``pipelined``: one connection, one read per message
  (``<body> . MAIL RCPT DATA``).

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

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.logger import globalLogBeginner  # noqa: E402

BODY = b"Subject: x\r\n\r\n" + b"x" * 998 + b"\r\n"
HELO = b"HELO client.example\r\n"
MAIL = b"MAIL FROM:<a@example.org>\r\n"
RCPT = b"RCPT TO:<b@example.org>\r\n"
DATA = b"DATA\r\n"
END = BODY + b".\r\n"
QUIT = b"QUIT\r\n"


def _ts(quiet: bool) -> Callable[[], Any]:
    from twisted.internet.task import Clock

    from twisted_smtpd import SMTPFactory
    from twisted_smtpd.handlers import discard

    factory = SMTPFactory(discard, hostname="bench.local", quiet=quiet, reactor=Clock())
    return lambda: factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))


def _tm() -> Callable[[], Any]:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "servers"))
    from twisted_mail_server import AcceptAll, ESMTPFactory

    factory = ESMTPFactory(AcceptAll())
    return lambda: factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))


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
    shapes = {"conn": run_conn, "session": run_session, "pipelined": run_pipelined}
    servers = args.servers.split(",")
    print("us/message  " + "  ".join(f"{s:>9}" for s in servers))
    for shape in args.shapes.split(","):
        row = []
        for name in servers:
            build = builders[name]()
            shapes[shape](build, min(2000, args.messages))  # warm up
            row.append(shapes[shape](build, args.messages) / args.messages * 1e6)
        print(f"{shape:<10}  " + "  ".join(f"{v:9.1f}" for v in row))


if __name__ == "__main__":
    main()
