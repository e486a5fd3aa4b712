# -*- test-case-name: tests.test_ratelimit -*-
"""
Failed AUTH attempts counted per client address, across connections.

A client that reconnects after each 535 would otherwise guess without end
(the per-connection limit only costs it a TCP handshake).  L{FailureLimiter}
counts failures per address in a sliding window; the failure that reaches
the limit blocks the address for one whole window from then (its count starts
again afterwards).  Successes do not count.  IPv6 clients are counted per /64,
the block a single host usually has, so walking through its addresses gains
nothing.

Pure: the clock is a function returning seconds (C{reactor.seconds}).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["FailureLimiter", "parse_limit", "client_key"]


def parse_limit(text: str) -> tuple[int, float]:
    """C{"N/SECONDS"} -> (N, SECONDS); ValueError with a clear message."""
    count, slash, seconds = text.partition("/")
    try:
        limit, window = int(count), float(seconds)
    except ValueError:
        limit, window = 0, 0.0
    if not slash or limit < 1 or not window > 0:
        raise ValueError(
            f"expected N/SECONDS with N >= 1 and SECONDS > 0, not {text!r}"
        )
    return limit, window


def client_key(host: str) -> str:
    """The address failures are counted under: IPv4 as is, IPv6 by its /64."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return host


@dataclass
class _Record:
    failures: deque[float]
    blocked_until: float = 0.0


class FailureLimiter:
    """At most C{limit} failed AUTHs per C{window} seconds from one address.

    Args:
        limit: failures allowed within C{window}; the one reaching it blocks.
        window: seconds; also how long a block lasts.
        clock: returns the current time in seconds.
        max_addresses: addresses tracked at most (memory bound); past it the
            stale ones are swept, then the oldest dropped.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        clock: Callable[[], float],
        max_addresses: int = 100_000,
    ) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._max_addresses = max_addresses
        self._records: dict[str, _Record] = {}

    def blocked(self, host: str) -> bool:
        """Whether AUTH from C{host} is refused now."""
        record = self._records.get(client_key(host))
        return record is not None and record.blocked_until > self._clock()

    def retry_after(self, host: str) -> float:
        """Seconds until C{host} may try again (0 if not blocked)."""
        record = self._records.get(client_key(host))
        if record is None:
            return 0.0
        return max(0.0, record.blocked_until - self._clock())

    def failed(self, host: str) -> bool:
        """Count a failure from C{host}; True if it just got blocked (log it once)."""
        now = self._clock()
        key = client_key(host)
        record = self._records.get(key)
        if record is None:
            if len(self._records) >= self._max_addresses:
                self._sweep(now)
            record = self._records[key] = _Record(deque(maxlen=self.limit))
        elif record.blocked_until > now:
            return False  # already blocked: attempts are refused, not counted
        failures = record.failures
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        failures.append(now)
        if len(failures) < self.limit:
            return False
        failures.clear()
        record.blocked_until = now + self.window
        return True

    def _sweep(self, now: float) -> None:
        """Forget addresses with nothing recent, then the oldest down to 90%.

        Leaving room means a flood of new addresses sweeps once per tenth of
        C{max_addresses}, not once per address.
        """
        stale = [
            key
            for key, record in self._records.items()
            if record.blocked_until <= now
            and (not record.failures or record.failures[-1] <= now - self.window)
        ]
        for key in stale:
            del self._records[key]
        excess = len(self._records) - self._max_addresses * 9 // 10
        for key in list(self._records)[: max(excess, 0)]:
            del self._records[key]

    def __len__(self) -> int:
        return len(self._records)

    def describe(self) -> str:
        return f"{self.limit}/{self.window:g}"


def limiter_from_option(
    text: Optional[str], clock: Callable[[], float]
) -> Optional[FailureLimiter]:
    """The limiter for C{--auth-failure-limit} (C{"0"} or C{"off"}: none)."""
    if text is None or text.strip().lower() in ("0", "off", "none"):
        return None
    limit, window = parse_limit(text)
    return FailureLimiter(limit, window, clock)
