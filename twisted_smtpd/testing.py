# -*- test-case-name: tests.test_protocol -*-
"""
Helpers for testing code that uses twisted_smtpd, without sockets.

    clock = Clock()
    factory = SMTPFactory(MemoryHandler(), hostname="mx.test", reactor=clock)
    client = connect(factory)
    client.send(b"EHLO me\\r\\n")
    assert client.replies()[-1].startswith(b"250 ")
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from .protocol import SMTPServerProtocol

__all__ = ["TLSStringTransport", "FakeClient", "connect"]


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):  # type: ignore[misc]
    """A L{StringTransport} that records C{startTLS} and then claims to be TLS."""

    tls_context: Any = None

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        self.tls_context = contextFactory
        # From now on the protocol must see an ISSLTransport.
        from zope.interface import alsoProvides

        alsoProvides(self, ISSLTransport)


class FakeClient:
    """A protocol over a string transport, with helpers to talk to it."""

    def __init__(self, protocol: SMTPServerProtocol, transport: StringTransport):
        self.protocol = protocol
        self.transport = transport
        self._seen = 0

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def output(self) -> bytes:
        """Everything the server wrote since the last call."""
        value = self.transport.value()
        new, self._seen = value[self._seen :], len(value)
        return new

    def replies(self) -> list[bytes]:
        """The reply lines the server wrote since the last call, without CRLF."""
        return [line for line in self.output().split(b"\r\n") if line]

    def command(self, line: bytes) -> list[bytes]:
        """Send one command line, return the reply lines it got."""
        self.send(line + b"\r\n")
        return self.replies()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def connect(
    factory: Any,
    peer: Optional[IPv4Address] = None,
    transport: Optional[StringTransport] = None,
) -> FakeClient:
    """Connect a new protocol from C{factory} to an in-memory transport."""
    peer = peer or IPv4Address("TCP", "192.0.2.1", 40000)
    protocol = factory.buildProtocol(peer)
    transport = transport or TLSStringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 25), peerAddress=peer
    )
    protocol.makeConnection(transport)
    return FakeClient(protocol, transport)
