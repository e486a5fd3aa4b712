# -*- test-case-name: tests.test_deadlines -*-
"""
Session deadlines on one timer: every session's C{max_session_time}
(L{Deadlines}), and every session's idle timeout (L{IdleTimers}).

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

from heapq import heapify, heappop, heappush
from typing import Any, Callable, Optional

__all__ = ["GRANULARITY", "Deadlines", "IdleTimers"]

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


#: IdleTimers compacts its heap when it holds more entries than this and
#: over half of them are disarmed (as the reactor does with cancelled calls)
_COMPACT_AT = 64


class IdleTimers:
    """Idle deadlines of many sessions on one timer, each exact.

    One C{DelayedCall} per session costs an idle session about 350 bytes and
    every connection a C{callLater} and a cancel; it also makes the reactor's
    heap deeper for every other call.  Here a session's deadline is an entry
    C{[when, seq, session]} in one heap (lists compare in C: C{when}, then
    the unique C{seq}), and one timer is armed for the earliest entry, at
    exactly its time.  L{disarm} marks an entry dead (O(1)); dead entries
    are dropped when due, compacted away when they are over half of the heap,
    and the timer is cancelled as soon as no live entry is left, so a
    factory with no session holds no timer.  When an entry comes due,
    C{expire(session)} is called (once per L{arm}); it decides whether the
    session's time is really up or arms it again.

    The clock is passed in (C{seconds()} and C{callLater}, a reactor or a
    C{Clock}).
    """

    __slots__ = ("_clock", "_expire", "_heap", "_live", "_seq", "_call", "_call_at")

    def __init__(self, clock: Any, expire: Callable[[Any], None]) -> None:
        self._clock = clock
        self._expire = expire
        self._heap: list[list[Any]] = []
        self._live = 0
        self._seq = 0
        self._call: Any = None
        self._call_at = 0.0  # when the armed call is due

    def __len__(self) -> int:
        """Live (armed) entries."""
        return self._live

    @property
    def timer(self) -> Any:
        """The one DelayedCall (None when no session is armed)."""
        return self._call

    def arm(self, session: Any, when: float) -> list[Any]:
        """C{expire(session)} at C{when} (clock seconds); the entry, to L{disarm}."""
        seq = self._seq = self._seq + 1
        entry = [when, seq, session]
        heappush(self._heap, entry)
        self._live += 1
        if self._call is None or when < self._call_at:
            self._schedule(when)
        return entry

    def disarm(self, entry: list[Any]) -> None:
        """The entry's session is no longer due (closed, or re-armed)."""
        if entry[2] is None:
            return
        entry[2] = None
        self._live -= 1
        heap = self._heap
        if not self._live:
            heap.clear()
            call, self._call = self._call, None
            if call is not None and call.active():
                call.cancel()
        elif len(heap) > _COMPACT_AT and self._live < len(heap) >> 1:
            heap[:] = [live for live in heap if live[2] is not None]
            heapify(heap)

    def _schedule(self, when: float) -> None:
        call = self._call
        if call is not None and call.active():
            call.cancel()
        now = self._clock.seconds()
        self._call_at = when
        self._call = self._clock.callLater(when - now if when > now else 0.0, self._due)

    def _due(self) -> None:
        self._call = None
        heap = self._heap
        now = self._clock.seconds()
        expired = []
        while heap and heap[0][0] <= now:
            entry = heappop(heap)
            session = entry[2]
            if session is not None:
                entry[2] = None
                self._live -= 1
                expired.append(session)
        failed: Optional[Exception] = None
        for session in expired:
            try:
                self._expire(session)  # may arm it (or others) again
            except Exception as error:
                # Out of the heap already: the others must still be told.
                failed = failed or error
        while heap and heap[0][2] is None:
            heappop(heap)
        # For the head, whatever expire() armed meanwhile.
        if heap and (self._call is None or self._call_at != heap[0][0]):
            self._schedule(heap[0][0])
        if failed is not None:
            raise failed  # the clock's caller logs it (the reactor does)
