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


# -- in the protocol ----------------------------------------------------------

from twisted.internet import threads  # noqa: E402

from twisted_smtpd import SMTPFactory  # noqa: E402
from twisted_smtpd.handlers import MemoryHandler  # noqa: E402
from twisted_smtpd.testing import connect  # noqa: E402


class Lookups:
    """A stand-in ReverseDNS whose answers the test gives."""

    def __init__(self) -> None:
        self.pending: dict[str, defer.Deferred] = {}

    def lookup(self, host: str) -> defer.Deferred:
        self.pending[host] = d = defer.Deferred()
        return d


def session(rdns):
    memory = MemoryHandler()
    factory = SMTPFactory(memory, hostname="mx.test", reactor=Clock(), reverse_dns=rdns)
    return memory, connect(factory)


def test_greeting_not_delayed_and_data_waits_for_the_name() -> None:
    lookups = Lookups()
    memory, client = session(lookups)
    assert [b"220 mx.test ESMTP twisted_smtpd ready"] == client.replies()
    assert ["192.0.2.1"] == list(lookups.pending)
    client.command(b"EHLO c.example")
    client.command(b"MAIL FROM:<a@b.example>")
    client.command(b"RCPT TO:<c@d.example>")
    # DATA (and what is pipelined behind it) waits for the name.
    assert [] == client.command(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.")
    lookups.pending["192.0.2.1"].callback("host.example.test")
    assert [b"354 End data with <CR><LF>.<CR><LF>"] == client.replies()[:1]
    envelope = memory.messages[0]
    assert "host.example.test" == envelope.peer_name
    assert envelope.received_header.startswith(
        b"Received: from c.example (host.example.test [192.0.2.1])"
    )


def test_bdat_waits_too() -> None:
    lookups = Lookups()
    memory, client = session(lookups)
    client.command(b"EHLO c.example")
    client.command(b"MAIL FROM:<a@b.example>")
    client.command(b"RCPT TO:<c@d.example>")
    client.send(b"BDAT 10 LAST\r\nSubject:\r\n")
    assert [] == client.replies()
    lookups.pending["192.0.2.1"].callback("unknown")
    assert [b"250 2.0.0 OK: queued as "] == [r[:24] for r in client.replies()]
    assert b"Subject:\r\n" == memory.messages[0].content
    assert b"(unknown [192.0.2.1])" in memory.messages[0].received_header


def test_name_known_before_data_no_wait() -> None:
    lookups = Lookups()
    memory, client = session(lookups)
    lookups.pending["192.0.2.1"].callback("host.example.test")
    client.command(b"EHLO c.example")
    client.command(b"MAIL FROM:<a@b.example>")
    client.command(b"RCPT TO:<c@d.example>")
    assert [b"354 End data with <CR><LF>.<CR><LF>"] == client.command(b"DATA")


def test_connection_lost_while_waiting_opens_no_message() -> None:
    lookups = Lookups()
    memory, client = session(lookups)
    client.command(b"EHLO c.example")
    client.command(b"MAIL FROM:<a@b.example>")
    client.command(b"RCPT TO:<c@d.example>")
    client.command(b"DATA")
    client.protocol.connectionLost(None)
    lookups.pending["192.0.2.1"].callback("host.example.test")
    assert b"354" not in client.output()


def test_off_by_default_in_the_api() -> None:
    memory, client = session(None)
    client.command(b"EHLO c.example")
    client.command(b"MAIL FROM:<a@b.example>")
    client.command(b"RCPT TO:<c@d.example>")
    client.command(b"DATA")
    client.command(b"x\r\n.")
    assert None is memory.messages[0].peer_name
    assert memory.messages[0].received_header.startswith(
        b"Received: from c.example ([192.0.2.1])"
    )


@pytest_twisted.inlineCallbacks
def test_end_to_end_smtplib(listen, dns_server):
    """A real socket, a real DNS server: the Received: header names the client."""
    import smtplib

    from twisted.internet import reactor

    _, port = dns_server
    memory = MemoryHandler()
    rdns = ReverseDNS(resolver_for(reactor, port), reactor=reactor, timeout=5)
    smtp_port = listen(memory, reverse_dns=rdns)

    def send():
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=20) as smtp:
            smtp.sendmail("a@b.example", ["c@d.example"], b"Subject: x\r\n\r\nhi\r\n")

    yield threads.deferToThread(send)
    envelope = memory.messages[0]
    assert "mail.example.test" == envelope.peer_name
    assert b"(mail.example.test [127.0.0.1])" in envelope.received_header


@pytest_twisted.inlineCallbacks
def test_end_to_end_dns_never_answers(listen):
    """A DNS server that never answers delays only DATA, by --dns-timeout at most."""
    import smtplib

    from twisted.internet import reactor

    silent = reactor.listenUDP(0, Silent(), interface="127.0.0.1")
    memory = MemoryHandler()
    resolver = resolver_for(reactor, silent.getHost().port)
    smtp_port = listen(memory, reverse_dns=ReverseDNS(resolver, timeout=0.5))

    def send():
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=20) as smtp:
            smtp.sendmail("a@b.example", ["c@d.example"], b"Subject: x\r\n\r\nhi\r\n")

    try:
        yield threads.deferToThread(send)
    finally:
        yield silent.stopListening()
    assert "unknown" == memory.messages[0].peer_name
    assert b"(unknown [127.0.0.1])" in memory.messages[0].received_header
