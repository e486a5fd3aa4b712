"""A twisted.mail.smtp ESMTP server that accepts everything and drops it.

The baseline for the benchmarks: the stock Twisted SMTP server with the most
trivial IMessageDelivery / IMessage possible.

    python bench/servers/twisted_mail_server.py --port 2526
"""

import argparse
import os
import sys

from twisted.internet import defer
from twisted.mail import smtp
from zope.interface import implementer


@implementer(smtp.IMessage)
class DiscardMessage:
    __slots__ = ()

    def lineReceived(self, line):
        pass

    def eomReceived(self):
        return defer.succeed(None)

    def connectionLost(self):
        pass


_MESSAGE = DiscardMessage()


def _message():
    return _MESSAGE


@implementer(smtp.IMessageDelivery)
class AcceptAll:
    def receivedHeader(self, helo, origin, recipients):
        # A real header, like twisted_smtpd and aiosmtpd add one.
        return smtp.rfc822date() and (
            b"Received: from "
            + helo[0]
            + b" by bench.local with ESMTP; "
            + smtp.rfc822date()
        )

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        return _message


class ESMTPFactory(smtp.SMTPFactory):
    protocol = smtp.ESMTP
    domain = b"bench.local"

    def __init__(self, delivery):
        super().__init__()
        self.delivery = delivery

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        p.delivery = self.delivery
        p.factory = self
        return p


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--backlog", type=int, default=1024)
    args = parser.parse_args(argv)

    from twisted.internet import reactor  # epoll on Linux
    from twisted.logger import globalLogBeginner, textFileLogObserver

    # Same as twistd -l /dev/null: log events are formatted and dropped.
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(open(os.devnull, "w"))], redirectStandardIO=False
    )
    reactor.listenTCP(
        args.port, ESMTPFactory(AcceptAll()), backlog=args.backlog, interface=args.host
    )
    sys.stdout.write(f"listening on {args.host}:{args.port}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
