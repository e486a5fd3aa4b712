"""Forward-confirmed reverse DNS: a twisted.names server on loopback; Clock units."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import dns, error

from twisted_smtpd.rdns import UNKNOWN, ReverseDNS

from .dnsserver import Silent, resolver_for, serve

ZONE = {
    ("1.0.0.127.in-addr.arpa", dns.PTR): [dns.Record_PTR(b"mail.example.test")],
    ("mail.example.test", dns.A): [dns.Record_A("127.0.0.1")],
    # A PTR its owner wrote, whose name does not point back.
    ("2.0.0.127.in-addr.arpa", dns.PTR): [dns.Record_PTR(b"liar.example.test")],
    ("liar.example.test", dns.A): [dns.Record_A("192.0.2.9")],
    (
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa",
        dns.PTR,
    ): [dns.Record_PTR(b"six.example.test")],
    ("six.example.test", dns.AAAA): [dns.Record_AAAA("::1")],
}


@pytest.fixture
def dns_server():
    from twisted.internet import reactor

    zone, port, listening = serve(reactor, ZONE)
    yield zone, port
    listening.stopListening()


@pytest_twisted.inlineCallbacks
def test_confirmed_names_over_real_dns(dns_server):
    """PTR then A/AAAA back to the address: the name; else unknown."""
    from twisted.internet import reactor

    zone, port = dns_server
    rdns = ReverseDNS(resolver_for(reactor, port), reactor=reactor, timeout=5)
    assert "mail.example.test" == (yield rdns.lookup("127.0.0.1"))
    assert UNKNOWN == (yield rdns.lookup("127.0.0.2"))  # not forward-confirmed
    assert UNKNOWN == (yield rdns.lookup("127.0.0.3"))  # NXDOMAIN
    assert "six.example.test" == (yield rdns.lookup("::1"))
    assert "mail.example.test" == (yield rdns.lookup("::ffff:127.0.0.1"))
    # Cached: no second query for 127.0.0.1.
    assert 1 == zone.queries[("1.0.0.127.in-addr.arpa", dns.PTR)]


@pytest_twisted.inlineCallbacks
def test_server_that_never_answers():
    """A DNS server that never answers: unknown once the timeout passes."""
    from twisted.internet import reactor

    silent = Silent()
    listening = reactor.listenUDP(0, silent, interface="127.0.0.1")
    try:
        port = listening.getHost().port
        rdns = ReverseDNS(resolver_for(reactor, port), reactor=reactor, timeout=0.5)
        assert UNKNOWN == (yield rdns.lookup("127.0.0.1"))
        assert silent.received >= 1
        assert rdns.cached("127.0.0.1") is None  # a timeout is not remembered
    finally:
        yield listening.stopListening()


class FakeResolver:
    """Answers from a dict of ((name, type) -> Deferred or result), counting asks."""

    def __init__(self, clock: Clock, ttl: int = 60):
        self.clock = clock
        self.ttl = ttl
        self.asked: list[str] = []
        self.hang = False
        self.cancelled = 0

    def _answer(self, name: str, type_: int, payload):
        self.asked.append(name)
        if self.hang:
            return defer.Deferred(self._cancel)
        if payload is None:
            return defer.fail(error.DNSNameError(name))
        header = dns.RRHeader(name.encode(), type_, dns.IN, self.ttl, payload)
        return defer.succeed(([header], [], []))

    def _cancel(self, _):
        self.cancelled += 1

    def lookupPointer(self, name, timeout=None):
        known = name.startswith("7.")
        payload = dns.Record_PTR(b"host.example.test") if known else None
        return self._answer(name, dns.PTR, payload)

    def lookupAddress(self, name, timeout=None):
        return self._answer(name, dns.A, dns.Record_A("192.0.2.7"))


class TestCacheAndTimeout:
    def setup_method(self):
        self.clock = Clock()
        self.resolver = FakeResolver(self.clock)
        self.rdns = ReverseDNS(
            self.resolver, reactor=self.clock, timeout=5, max_ttl=3600, negative_ttl=30
        )

    def result(self, host: str) -> str:
        results = []
        self.rdns.lookup(host).addCallback(results.append)
        return results[0] if results else None

    def test_ttl_bounds_the_cache(self) -> None:
        assert "host.example.test" == self.result("192.0.2.7")
        assert 2 == len(self.resolver.asked)  # PTR and A
        self.clock.advance(59)
        assert "host.example.test" == self.result("192.0.2.7")
        assert 2 == len(self.resolver.asked)
        self.clock.advance(2)  # past the 60 s TTL
        self.result("192.0.2.7")
        assert 4 == len(self.resolver.asked)

    def test_max_ttl_caps_long_ttls(self) -> None:
        self.resolver.ttl = 86400
        self.rdns.max_ttl = 100
        self.result("192.0.2.7")
        self.clock.advance(101)
        self.result("192.0.2.7")
        assert 4 == len(self.resolver.asked)

    def test_negative_answers_cached_for_negative_ttl(self) -> None:
        assert UNKNOWN == self.result("192.0.2.8")
        self.clock.advance(29)
        assert UNKNOWN == self.result("192.0.2.8")
        assert 1 == len(self.resolver.asked)
        self.clock.advance(2)
        self.result("192.0.2.8")
        assert 2 == len(self.resolver.asked)

    def test_timeout_answers_unknown_and_cancels(self) -> None:
        self.resolver.hang = True
        first, second = [], []
        self.rdns.lookup("192.0.2.7").addCallback(first.append)
        self.rdns.lookup("192.0.2.7").addCallback(second.append)
        assert 1 == len(self.resolver.asked)  # one query for both
        self.clock.advance(4.9)
        assert [] == first
        self.clock.advance(0.2)
        assert [UNKNOWN] == first == second
        assert 1 == self.resolver.cancelled
        assert self.clock.getDelayedCalls() == []

    def test_not_an_address(self) -> None:
        assert UNKNOWN == self.result("/tmp/socket")
        assert [] == self.resolver.asked
