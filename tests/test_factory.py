"""SMTPFactory: policy, connection accounting and graceful shutdown."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from twisted_smtpd import Limits, SMTPFactory
from twisted_smtpd.handlers import MemoryHandler
from twisted_smtpd.testing import connect


def lose(client) -> None:
    """What the reactor does once a closed transport is gone."""
    client.protocol.connectionLost(None)


class TestIds:
    def test_session_ids_unique(self, factory: SMTPFactory) -> None:
        """Every session gets a distinct id, used in logs and queue ids."""
        ids = {factory.new_session_id() for _ in range(1000)}
        assert 1000 == len(ids)


class TestPerIP:
    def test_per_ip_limit(self, memory: MemoryHandler, clock: Clock) -> None:
        """A second session from the same address is refused; others are not."""
        factory = SMTPFactory(
            memory,
            hostname="mx.test",
            reactor=clock,
            limits=Limits(max_connections_per_ip=1),
        )
        first = connect(factory, IPv4Address("TCP", "192.0.2.7", 1000))
        again = connect(factory, IPv4Address("TCP", "192.0.2.7", 1001))
        other = connect(factory, IPv4Address("TCP", "192.0.2.8", 1000))
        assert first.replies()[0].startswith(b"220 ")
        assert [b"421 mx.test Too many connections, try again later"] == again.replies()
        assert other.replies()[0].startswith(b"220 ")
        lose(again)
        lose(first)
        assert (
            connect(factory, IPv4Address("TCP", "192.0.2.7", 1002))
            .replies()[0]
            .startswith(b"220 ")
        )


class TestShutdown:
    def test_idle_sessions_closed_at_once(self, factory: SMTPFactory) -> None:
        """Idle sessions get 421 4.3.2 and the shutdown fires once they are gone."""
        client = connect(factory)
        client.command(b"EHLO c.example")
        done = factory.shutdown(grace=10)
        assert [b"421 4.3.2 mx.test Service shutting down, closing connection"] == (
            client.replies()
        )
        assert client.closed and not done.called
        lose(client)
        assert done.called

    def test_message_in_flight_finishes(
        self, factory: SMTPFactory, memory: MemoryHandler
    ) -> None:
        """A session in DATA finishes its message, gets 250, then 421."""
        client = connect(factory)
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        client.command(b"RCPT TO:<c@d.example>")
        client.command(b"DATA")
        client.send(b"first half\r\n")
        done = factory.shutdown(grace=10)
        assert [] == client.replies() and not client.closed
        client.send(b"second half\r\n.\r\nNOOP\r\n")
        replies = client.replies()
        assert replies[0].startswith(b"250 2.0.0 OK: queued as ")
        assert (
            b"421 4.3.2 mx.test Service shutting down, closing connection"
            == (replies[1])
        )
        assert [b"first half\r\nsecond half\r\n"] == [
            e.content for e in memory.messages
        ]
        lose(client)
        assert done.called

    def test_pending_handler_finishes(self, clock: Clock) -> None:
        """A session waiting for its handler gets the handler's answer first."""
        pending: Deferred = Deferred()
        factory = SMTPFactory(lambda e: pending, hostname="mx.test", reactor=clock)
        client = connect(factory)
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        client.command(b"RCPT TO:<c@d.example>")
        client.command(b"DATA")
        client.send(b"x\r\n.\r\n")
        factory.shutdown(grace=10)
        assert [] == client.replies()
        pending.callback("Q1")
        assert [
            b"250 2.0.0 OK: queued as Q1",
            b"421 4.3.2 mx.test Service shutting down, closing connection",
        ] == client.replies()

    def test_grace_period_bounds_the_wait(self, factory: SMTPFactory, clock) -> None:
        """After the grace period a stuck session is dropped."""
        client = connect(factory)
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        client.command(b"RCPT TO:<c@d.example>")
        client.command(b"DATA")
        done = factory.shutdown(grace=5)
        clock.advance(4)
        assert not client.closed
        clock.advance(1)
        assert client.closed
        lose(client)
        assert done.called

    def test_no_new_sessions(self, factory: SMTPFactory) -> None:
        """During shutdown a new connection is refused with 421."""
        factory.shutdown(grace=5)
        client = connect(factory)
        assert [b"421 mx.test Service shutting down, closing connection"] == (
            client.replies()
        )
