"""The AUTH failure limiter: per address, across connections, on a Clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from twisted_smtpd._ratelimit import FailureLimiter, client_key, parse_limit


def limiter(limit: int = 3, window: float = 600) -> tuple[FailureLimiter, Clock]:
    clock = Clock()
    return FailureLimiter(limit, window, clock.seconds), clock


def test_blocks_at_the_limit_for_one_window() -> None:
    limits, clock = limiter()
    assert not limits.failed("192.0.2.1")
    clock.advance(10)
    assert not limits.failed("192.0.2.1")
    assert not limits.blocked("192.0.2.1")
    assert limits.failed("192.0.2.1")  # the third: blocked, reported once
    assert limits.blocked("192.0.2.1")
    assert not limits.blocked("192.0.2.2")  # other addresses are not
    assert not limits.failed("192.0.2.1")  # not reported again
    clock.advance(599)
    assert limits.blocked("192.0.2.1")
    assert 1 == pytest.approx(limits.retry_after("192.0.2.1"))
    clock.advance(1)
    assert not limits.blocked("192.0.2.1")
    # The count starts again after the block.
    assert not limits.failed("192.0.2.1")
    assert not limits.blocked("192.0.2.1")


def test_failures_age_out_of_the_window() -> None:
    limits, clock = limiter(limit=2, window=60)
    limits.failed("192.0.2.1")
    clock.advance(61)
    assert not limits.failed("192.0.2.1")  # the first one is gone
    assert limits.failed("192.0.2.1")


def test_ipv6_counted_per_64() -> None:
    limits, _ = limiter(limit=2)
    limits.failed("2001:db8::1")
    assert limits.failed("2001:db8::2")
    assert limits.blocked("2001:db8::ffff")
    assert not limits.blocked("2001:db8:0:1::1")
    assert "192.0.2.1" == client_key("::ffff:192.0.2.1")


def test_memory_bounded() -> None:
    clock = Clock()
    limits = FailureLimiter(5, 60, clock.seconds, max_addresses=100)
    for i in range(1000):
        limits.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limits) <= 100


@pytest.mark.parametrize("text", ["", "5", "0/60", "5/0", "x/60", "5/x", "-1/9"])
def test_parse_limit_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="N/SECONDS"):
        parse_limit(text)


def test_parse_limit() -> None:
    assert (10, 600.0) == parse_limit("10/600")


# -- across connections, in the protocol --------------------------------------

from base64 import b64encode  # noqa: E402

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.logger import formatEvent, globalLogPublisher  # noqa: E402

from twisted_smtpd import SMTPFactory  # noqa: E402
from twisted_smtpd._events import SessionEvents  # noqa: E402
from twisted_smtpd.auth import AuthPolicy  # noqa: E402
from twisted_smtpd.handlers import MemoryHandler  # noqa: E402
from twisted_smtpd.testing import connect  # noqa: E402

WRONG = b"AUTH PLAIN " + b64encode(b"\0alice\0wrong")
RIGHT = b"AUTH PLAIN " + b64encode(b"\0alice\0secret")
LIMITED = b"454 4.7.0 Too many failed authentications from your address, try later"


class Refusals(SessionEvents):
    def __init__(self) -> None:
        self.refused: list[str] = []

    def connection_refused(self, reason: str) -> None:
        self.refused.append(reason)


def auth_factory(required: bool = False, limit=(3, 600)):
    db = InMemoryUsernamePasswordDatabaseDontUse()
    db.addUser(b"alice", b"secret")
    auth = AuthPolicy.from_checkers(
        [db], allow_without_tls=True, failure_delay=0, required=required
    )
    clock = Clock()
    events = Refusals()
    factory = SMTPFactory(
        MemoryHandler(),
        hostname="mx.test",
        reactor=clock,
        auth=auth,
        auth_failure_limit=limit,
        events=events,
    )
    return factory, clock, events


def session(factory, host: str = "192.0.2.1"):
    client = connect(factory, peer=IPv4Address("TCP", host, 40000))
    client.replies()
    client.command(b"EHLO c.example")
    return client


def test_failures_across_connections_then_454_until_the_window_passes() -> None:
    factory, clock, _ = auth_factory()
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        for _ in range(3):  # one failure per connection: reconnecting is no escape
            client = session(factory)
            assert [b"535 5.7.8 Authentication credentials invalid"] == client.command(
                WRONG
            )
            client.protocol.connectionLost(None)
        client = session(factory)
        assert [LIMITED] == client.command(RIGHT)  # even the right password
        assert [LIMITED] == client.command(WRONG)
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")  # the session goes on
        other = session(factory, "192.0.2.2")
        assert other.command(RIGHT)[0].startswith(b"235 ")
    finally:
        globalLogPublisher.removeObserver(logged.append)
    lines = [formatEvent(e) for e in logged if "AUTH failure limit" in formatEvent(e)]
    assert [
        "smtpd: 192.0.2.1 reached the AUTH failure limit (3/600): AUTH"
        " refused for 600 s"
    ] == lines
    clock.advance(600)
    assert session(factory).command(RIGHT)[0].startswith(b"235 ")


def test_successes_do_not_count() -> None:
    factory, _, _ = auth_factory()
    for _ in range(5):
        client = session(factory)
        assert client.command(RIGHT)[0].startswith(b"235 ")
        client.protocol.connectionLost(None)
    client = session(factory)
    client.command(WRONG)
    assert client.command(WRONG)[0].startswith(b"535 ")


def test_auth_required_refuses_the_connection_421() -> None:
    factory, _, events = auth_factory(required=True)
    client = session(factory)
    for _ in range(3):
        client.command(WRONG)
    late = connect(factory, peer=IPv4Address("TCP", "192.0.2.1", 40001))
    assert [
        b"421 mx.test Too many failed authentications from your address, try later"
    ] == late.replies()
    assert late.closed
    assert ["auth_rate_limit"] == events.refused


def test_off() -> None:
    factory, _, _ = auth_factory(limit=None)
    for _ in range(4):
        client = session(factory)
        client.command(WRONG)
        client.protocol.connectionLost(None)
    assert session(factory).command(RIGHT)[0].startswith(b"235 ")
