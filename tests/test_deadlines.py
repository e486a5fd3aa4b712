"""Session deadlines on one timer (_deadlines.Deadlines), driven by a Clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from twisted_smtpd._deadlines import GRANULARITY, Deadlines


class Session:
    def __init__(self, name: str, clock: Clock, log: list) -> None:
        self.name, self.clock, self.log = name, clock, log


def expire(session: Session) -> None:
    session.log.append((session.name, session.clock.seconds()))


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_one_timer_for_all_and_each_on_time(clock: Clock) -> None:
    """Sessions started a few seconds apart end at their own deadlines."""
    log: list = []
    deadlines = Deadlines(clock, expire)
    first, second = Session("a", clock, log), Session("b", clock, log)
    deadlines.add(first, 100)
    clock.advance(5)
    deadlines.add(second, 100)
    assert 1 == len(clock.getDelayedCalls())
    clock.advance(95)
    assert [("a", 100)] == log
    clock.advance(5)
    assert [("a", 100), ("b", 105)] == log
    assert [] == clock.getDelayedCalls() and 0 == len(deadlines)


def test_close_sessions_end_in_one_call_at_most_a_granule_late(clock: Clock) -> None:
    """Deadlines within one GRANULARITY of each other: at most one call per
    granule, none early, none more than GRANULARITY late."""
    log: list = []
    deadlines = Deadlines(clock, expire)
    sessions = [Session(str(n), clock, log) for n in range(10)]
    for session in sessions:
        deadlines.add(session, 50)
        clock.advance(0.25)
    starts = {session.name: 0.25 * n for n, session in enumerate(sessions)}
    fired = set()
    while len(deadlines):
        clock.advance(0.05)
        fired.update(when for _, when in log)
    for name, when in log:
        due = starts[name] + 50
        assert due <= when <= due + GRANULARITY
    assert 10 == len(log)
    assert len(fired) <= 4  # 2.5 s of deadlines: a call per granule at most


def test_a_closed_session_is_forgotten_and_the_timer_stops(clock: Clock) -> None:
    log: list = []
    deadlines = Deadlines(clock, expire)
    first, second = Session("a", clock, log), Session("b", clock, log)
    deadlines.add(first, 10)
    deadlines.add(second, 20)
    deadlines.discard(first)
    assert first not in deadlines and second in deadlines
    clock.advance(10)  # the timer was the head's: it finds nothing due
    assert [] == log
    clock.advance(10)
    assert [("b", 20)] == log
    deadlines.add(first, 10)
    deadlines.discard(first)
    deadlines.discard(first)  # twice is harmless
    assert [] == clock.getDelayedCalls() and deadlines.timer is None


def test_an_expire_that_raises_keeps_the_others(clock: Clock) -> None:
    log: list = []

    def fragile(session: Session) -> None:
        if session.name == "bad":
            raise RuntimeError("boom")
        expire(session)

    deadlines = Deadlines(clock, fragile)
    deadlines.add(Session("bad", clock, log), 10)
    deadlines.add(Session("good", clock, log), 20)
    with pytest.raises(RuntimeError):
        clock.advance(10)
    clock.advance(10)
    assert [("good", 20)] == log


def test_an_expire_that_raises_spares_none_due_with_it(clock: Clock) -> None:
    """Sessions due in the same call as one whose expiry raises are still
    told (they are out of the queue already); the error still propagates."""
    log: list = []

    def fragile(session: Session) -> None:
        if session.name == "bad":
            raise RuntimeError("boom")
        expire(session)

    deadlines = Deadlines(clock, fragile)
    for name in ("first", "bad", "last"):
        deadlines.add(Session(name, clock, log), 10)
    with pytest.raises(RuntimeError):
        clock.advance(10)
    assert [("first", 10), ("last", 10)] == log
    assert 0 == len(deadlines) and [] == clock.getDelayedCalls()
