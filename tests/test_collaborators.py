"""The protocol's collaborators on their own: each owns its state and is
tested without a connection (TLSWatch, ClientName/name_client, XCLIENT's
session change, the outcome summary)."""

from __future__ import annotations

from typing import Any

import pytest
from OpenSSL.SSL import Error as TLSError
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from twisted_smtpd._outcomes import outcome_summary
from twisted_smtpd._peer import forward_client, xclient_update
from twisted_smtpd._session import Limits, Session, TLSInfo
from twisted_smtpd._tlswatch import TLSWatch
from twisted_smtpd._xclient import AddressList, parse_xclient
from twisted_smtpd.rdns import ClientName, name_client
from twisted_smtpd.replies import SMTPError


def make_session(host: str = "192.0.2.1", tls: Any = None) -> Session:
    return Session("S1", IPv4Address("TCP", host, 4000), Limits(), tls_info=tls)


class Events:
    def __init__(self) -> None:
        self.handshakes: list[bool] = []

    def tls_handshake(self, ok: bool) -> None:
        self.handshakes.append(ok)


class Connection:
    """What TLSWatch reads through transport.getHandle()."""

    cipher = ""

    def get_cipher_name(self) -> str:
        return self.cipher

    def get_protocol_version_name(self) -> str:
        return "TLSv1.3" if self.cipher else ""

    def get_peer_certificate(self, as_cryptography: bool) -> None:
        return None


class Transport:
    def __init__(self) -> None:
        self.connection = Connection()

    def getHandle(self) -> Connection:
        return self.connection


class TestTLSWatch:
    def watch(self) -> tuple[TLSWatch, Transport, Session, Events, Clock, list]:
        transport, session, events, clock = (
            Transport(),
            make_session(tls=TLSInfo("", "")),
            Events(),
            Clock(),
        )
        watch = TLSWatch(transport, session, events)
        expired: list = []
        watch.expect(clock, 10, lambda: expired.append(True))
        return watch, transport, session, events, clock, expired

    def test_deadline(self) -> None:
        """A handshake not done in time: the protocol is told, the event says so."""
        watch, _, _, events, clock, expired = self.watch()
        clock.advance(9.9)
        assert [] == expired
        clock.advance(0.1)
        assert ([True], [False]) == (expired, events.handshakes)

    def test_done_but_not_told(self) -> None:
        """A handshake the transport finished without the callback is no timeout."""
        watch, transport, _, events, clock, expired = self.watch()
        transport.connection.cipher = "TLS_AES_128_GCM_SHA256"
        clock.advance(10)
        assert ([], []) == (expired, events.handshakes)

    def test_completed(self) -> None:
        """handshakeCompleted: the deadline stops and the facts reach the session."""
        watch, transport, session, events, clock, expired = self.watch()
        transport.connection.cipher = "TLS_AES_128_GCM_SHA256"
        watch.completed()
        clock.advance(60)
        assert [] == expired
        assert ("TLSv1.3", "TLS_AES_128_GCM_SHA256") == (
            session.tls.protocol,
            session.tls.cipher,
        )
        assert [True] == events.handshakes
        assert [] == clock.getDelayedCalls()

    def test_cancel_and_lost(self) -> None:
        """Closing cancels the deadline; a TLS error at close is one event."""
        watch, _, _, events, clock, expired = self.watch()
        watch.cancel()
        assert [] == clock.getDelayedCalls()
        watch.lost(Failure(TLSError([("SSL routines", "", "bad record mac")])))
        watch.lost(None)
        assert ([], [False]) == (expired, events.handshakes)

    def test_no_timeout(self) -> None:
        """A zero timeout arms nothing."""
        watch = TLSWatch(Transport(), make_session(), None)
        clock = Clock()
        watch.expect(clock, 0, lambda: None)
        assert [] == clock.getDelayedCalls()


class Resolver:
    """A ReverseDNS stand-in: a cache, and lookups the test answers."""

    def __init__(self, cache: dict[str, str]) -> None:
        self.cache = cache
        self.pending: dict[str, defer.Deferred] = {}

    def cached(self, host: str) -> Any:
        return self.cache.get(host)

    def lookup(self, host: str) -> defer.Deferred:
        self.pending[host] = d = defer.Deferred()
        return d


class TestClientName:
    def test_cached_name_needs_no_lookup(self) -> None:
        """A name the cache knows is set at once; there is nothing to wait for."""
        session = make_session()
        assert (
            name_client(
                Resolver({"192.0.2.1": "a.example"}), session, "192.0.2.1", None
            )
            is None
        )
        assert "a.example" == session.peer_name

    def test_lookup_then_hold(self) -> None:
        """A lookup in progress holds a message until it answers."""
        rdns, session = Resolver({}), make_session()
        client = name_client(rdns, session, "192.0.2.1", None)
        assert isinstance(client, ClientName)

        class Protocol:
            held: list = []
            again: list = []

            def _hold(self, wait: defer.Deferred) -> None:
                self.held.append(wait)

            def _complete(self, result: Any, then: Any, *args: Any) -> None:
                then(result, *args)

            def _run_again(self, _: Any, method: Any, argument: str) -> None:
                self.again.append((method, argument))

            def _unexpected(self, failure: Failure) -> None:
                raise AssertionError(failure)

        protocol = Protocol()
        assert client.hold(protocol, "DATA", "")
        rdns.pending["192.0.2.1"].callback("a.example")
        assert ("a.example", [("DATA", "")]) == (session.peer_name, protocol.again)
        assert not client.hold(protocol, "DATA", "")  # known now

    def test_cached_answer_forgets_the_earlier_lookup(self) -> None:
        """XCLIENT names a cached client: the first client's late answer is ignored."""
        rdns = Resolver({"192.0.2.9": "b.example"})
        session = make_session()
        first = name_client(rdns, session, "192.0.2.1", None)
        assert name_client(rdns, session, "192.0.2.9", first) is None
        rdns.pending["192.0.2.1"].callback("a.example")
        assert "b.example" == session.peer_name


class TestXClient:
    def test_refused_to_others(self) -> None:
        """Only an allowed client may send XCLIENT: 550 5.7.0 otherwise."""
        with pytest.raises(SMTPError) as raised:
            xclient_update(make_session(), "ADDR=192.0.2.7")
        assert 550 == raised.value.reply.code

    def test_forward(self) -> None:
        """The session becomes the named client; a new address drops the old
        name and is to be looked up; the forwarded client is not allowed more."""
        session = make_session()
        session.peer_name = "proxy.example"
        session.xclient_allowed = True
        update = xclient_update(session, "ADDR=2001:db8::7 PORT=25 HELO=spike.example")
        old_ip, look_up = forward_client(session, update, AddressList(["192.0.2.0/24"]))
        assert ("192.0.2.1", "2001:db8::7") == (old_ip, look_up)
        assert IPv6Address("TCP", "2001:db8::7", 25) == session.peer
        assert (None, "spike.example", False) == (
            session.peer_name,
            session.helo,
            session.xclient_allowed,
        )

    def test_name_given(self) -> None:
        """NAME replaces any lookup ("" : drop it, look nothing up)."""
        session = make_session()
        update = parse_xclient("NAME=spike.example")
        assert ("192.0.2.1", "") == forward_client(session, update, AddressList([]))
        assert "spike.example" == session.peer_name


@pytest.mark.parametrize(
    "stored, total, per_recipient, expected",
    [
        (2, 2, False, ("accepted", "accepted")),
        (1, 2, False, ("refused", "refused")),
        (1, 2, True, ("accepted for 1 of 2", "accepted")),
        (0, 2, True, ("refused", "refused")),
    ],
)
def test_outcome_summary(stored, total, per_recipient, expected) -> None:
    """Only per-recipient replies (LMTP) accept a partial delivery."""
    assert expected == outcome_summary(stored, total, per_recipient)


def test_a_plain_session_has_no_collaborators_and_two_flags() -> None:
    """A plain session (no TLS, AUTH, reverse DNS, BDAT) makes none of the
    optional collaborators, and its only mutable booleans are _busy and
    _direct_write: state with more values is one field, not a flag each."""
    from twisted_smtpd import SMTPFactory
    from twisted_smtpd.handlers import MemoryHandler
    from twisted_smtpd.testing import connect

    memory = MemoryHandler()
    client = connect(SMTPFactory(memory, hostname="mx.test", reactor=Clock()))
    for line in (b"EHLO c.example", b"MAIL FROM:<a@example.org>"):
        client.command(line)
    client.command(b"RCPT TO:<b@example.org>")
    client.command(b"DATA")
    assert client.command(b"Subject: x\r\n\r\nhi\r\n.")[0].startswith(b"250")
    protocol = client.protocol
    assert (None, None, None) == (protocol._tls, protocol._name, protocol._message)
    flags = {
        name
        for klass in type(protocol).__mro__
        for name, value in [*vars(klass).items(), *vars(protocol).items()]
        if isinstance(value, bool) and not name.isupper() and name != "lmtp"
    }
    # _debug is the factory's setting, copied once; LineReceiver's own flags
    # are class attributes never set here (its dataReceived is replaced).
    assert {"_busy", "_direct_write", "_debug", "paused", "_busyReceiving"} == flags
    assert not any(
        name in vars(protocol) for name in ("paused", "_busyReceiving", "line_mode")
    )
    assert 1 == len(memory.messages)
