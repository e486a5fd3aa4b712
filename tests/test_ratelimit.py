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
