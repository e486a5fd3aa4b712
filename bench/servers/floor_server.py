"""The Twisted floor: a reference, not a peer.

About the least Python a Twisted SMTP server can run per message: every
command gets a canned reply, DATA is scanned in bulk for the end marker, and
nothing is parsed, checked, logged or stored.  No real server can be this
cheap; the benchmarks report twisted_smtpd as a fraction of it, to show how
much of what Twisted on this CPython allows we reach.

    python bench/servers/floor_server.py --port 2528
"""

import argparse
import sys

from twisted.internet.protocol import Factory, Protocol

_REPLIES = {
    b"EHLO": (
        b"250-floor.local\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 209715200\r\n"
    ),
    b"HELO": b"250 floor.local\r\n",
    b"MAIL": b"250 2.1.0 Ok\r\n",
    b"RCPT": b"250 2.1.5 Ok\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
    b"DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    b"QUIT": b"221 2.0.0 Bye\r\n",
}
_UNKNOWN = b"500 5.5.2 Error: command not recognized\r\n"
_QUEUED = b"250 2.0.0 Ok: queued\r\n"
_END = b"\r\n.\r\n"


class Floor(Protocol):
    def connectionMade(self) -> None:
        self.buffer = b""
        self.in_data = False
        self.transport.write(b"220 floor.local ESMTP\r\n")

    def dataReceived(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        out = []
        pos = 0
        end = len(buffer)
        closing = False
        while pos < end:
            if self.in_data:
                # The marker may start with the CRLF that ended the 354's line.
                found = buffer.find(_END, pos - 2 if pos >= 2 else pos)
                if found < 0:
                    # Keep only what could be the start of a marker.
                    pos = max(pos, end - 4)
                    break
                pos = found + len(_END)
                self.in_data = False
                out.append(_QUEUED)
                continue
            eol = buffer.find(b"\r\n", pos)
            if eol < 0:
                break
            verb = buffer[pos : pos + 4].upper()
            pos = eol + 2
            out.append(_REPLIES.get(verb, _UNKNOWN))
            if verb == b"DATA":
                self.in_data = True
            elif verb == b"QUIT":
                closing = True
                break
        self.buffer = buffer[pos:]
        if out:
            self.transport.write(b"".join(out))
        if closing:
            self.transport.loseConnection()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--backlog", type=int, default=1024)
    args = parser.parse_args(argv)

    from twisted.internet import reactor  # epoll on Linux

    factory = Factory.forProtocol(Floor)
    factory.noisy = False
    reactor.listenTCP(args.port, factory, backlog=args.backlog, interface=args.host)
    sys.stdout.write(f"listening on {args.host}:{args.port}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
