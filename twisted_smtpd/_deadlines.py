# -*- test-case-name: tests.test_deadlines -*-
"""
Session deadlines on one timer: every session's C{max_session_time}.

A DelayedCall per connection costs every idle session about 350 bytes and
the reactor a heap push and a cancel.  Sessions of one factory start in time
order and share the limit, so their deadlines come in the order they were
added: an insertion-ordered dict (session -> deadline) is a queue whose head
is the next one due, with O(1) removal when a session closes.  A deadline
is rounded up to a multiple of L{GRANULARITY} seconds, so a session ends
at most that late; the sessions that started within one such step share
one deadline (one float, not one each) and end in one timer call.  One
timer is armed, for the head.

The clock is passed in (C{seconds()} and C{callLater}, a reactor or a
C{Clock}); nothing here imports Twisted.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["GRANULARITY", "Deadlines"]

#: deadlines are rounded up to a multiple of this: the most one fires late
GRANULARITY = 1.0


class Deadlines:
    """Sessions and the time each must end by; C{expire(session)} when due.

    Deadlines must be added in time order (one limit, a clock that does not
    go back); one added out of order waits for those before it.
    """

    __slots__ = ("_clock", "_expire", "_due", "_call", "_last")

    def __init__(self, clock: Any, expire: Callable[[Any], None]) -> None:
        self._clock = clock
        self._expire = expire
        self._due: dict[Any, float] = {}
        self._call: Any = None
        self._last = 0.0  # the deadline added last (shared while it is the same)

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, session: Any) -> bool:
        return session in self._due

    @property
    def timer(self) -> Any:
        """The one DelayedCall armed for the head (None when none is due)."""
        return self._call

    def add(self, session: Any, seconds: float) -> None:
        """C{session} must end within C{seconds} from now."""
        clock = self._clock
        now = clock.seconds()
        # Rounded up to the step (ceil without a call): shared while it lasts.
        deadline = -(-(now + seconds) // GRANULARITY) * GRANULARITY
        if deadline != self._last:
            self._last = deadline
        due = self._due
        due[session] = self._last
        if self._call is None:
            head = self._last if len(due) == 1 else next(iter(due.values()))
            delay = head - now if head > now else 0.0
            self._call = clock.callLater(delay, self._expire_due)

    def discard(self, session: Any) -> None:
        """C{session} is over: no deadline for it (no timer once none is left)."""
        due = self._due
        if due.pop(session, None) is not None and not due:
            call, self._call = self._call, None
            if call is not None and call.active():
                call.cancel()

    def _arm(self) -> None:
        head = next(iter(self._due.values()))
        delay = max(0.0, head - self._clock.seconds())
        self._call = self._clock.callLater(delay, self._expire_due)

    def _expire_due(self) -> None:
        self._call = None
        now = self._clock.seconds()
        due = self._due
        expired = []
        for session, deadline in due.items():
            if deadline > now:
                break
            expired.append(session)
        for session in expired:
            del due[session]
        failed: list[Exception] = []
        for session in expired:
            try:
                self._expire(session)
            except Exception as error:
                # Out of the queue already: the others must still be told.
                failed.append(error)
        if due and self._call is None:
            self._arm()
        if failed:
            raise failed[0]  # the clock's caller logs it (the reactor does)
