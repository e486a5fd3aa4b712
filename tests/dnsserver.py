"""A private DNS server on loopback for the reverse-DNS tests (twisted.names)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.names import client, common, dns, error, server


class ZoneResolver(common.ResolverBase):
    """Answers from a dict {(name, type): [payload...]}; NXDOMAIN otherwise."""

    def __init__(self, records: dict[tuple[str, int], list[Any]], ttl: int = 300):
        super().__init__()
        self.records = records
        self.ttl = ttl
        self.queries: Counter[tuple[str, int]] = Counter()

    def _lookup(self, name, cls, type, timeout):  # noqa: A002 (twisted's name)
        key = (name.decode("ascii").lower().rstrip("."), type)
        self.queries[key] += 1
        payloads = self.records.get(key)
        if payloads is None:
            return defer.fail(error.DNSNameError(name))
        answers = [
            dns.RRHeader(name, type, cls, self.ttl, payload, auth=True)
            for payload in payloads
        ]
        return defer.succeed((answers, [], []))


class Silent(DatagramProtocol):
    """A DNS server that never answers."""

    def datagramReceived(self, data, addr):
        self.received = getattr(self, "received", 0) + 1


def serve(reactor, records: dict[tuple[str, int], list[Any]], ttl: int = 300):
    """Start a DNS server on 127.0.0.1: (zone, port, listening port)."""
    zone = ZoneResolver(records, ttl)
    factory = server.DNSServerFactory(clients=[zone])
    listening = reactor.listenUDP(
        0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1"
    )
    return zone, listening.getHost().port, listening


def resolver_for(reactor, port: int) -> client.Resolver:
    """A twisted.names client asking only 127.0.0.1:port."""
    return client.Resolver(servers=[("127.0.0.1", port)], reactor=reactor)
