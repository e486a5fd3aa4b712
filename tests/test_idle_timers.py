"""Idle timeouts of many sessions on one timer (_deadlines.IdleTimers), and
the protocol's idle timer on it, driven by a Clock."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.internet.defer import DeferredList
from twisted.internet.task import Clock

from twisted_smtpd import Limits, SMTPFactory
from twisted_smtpd._deadlines import IdleTimers
from twisted_smtpd.handlers import MemoryHandler
from twisted_smtpd.protocol import SMTPServerProtocol
from twisted_smtpd.testing import connect

TIMEOUT_421 = b"421 mx.test Timeout, closing connection"  # no EHLO: no 4.4.2


class Fired:
    """The expire callback: records (session, time) pairs."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.log: list[tuple[str, float]] = []

    def __call__(self, session: str) -> None:
        self.log.append((session, self.clock.seconds()))


def test_each_due_exactly_on_one_timer(clock: Clock) -> None:
    fired = Fired(clock)
    timers = IdleTimers(clock, fired)
    for name, when in [("c", 30.0), ("a", 10.0), ("b", 20.5), ("d", 30.0)]:
        timers.arm(name, when)
    assert 1 == len(clock.getDelayedCalls()) and 4 == len(timers)
    clock.advance(9.999)
    assert [] == fired.log
    clock.advance(0.001)
    assert [("a", 10.0)] == fired.log
    clock.advance(10.5)
    clock.advance(9.5)
    assert [("a", 10.0), ("b", 20.5), ("c", 30.0), ("d", 30.0)] == fired.log
    assert [] == clock.getDelayedCalls() and 0 == len(timers)


def test_an_earlier_entry_moves_the_timer(clock: Clock) -> None:
    fired = Fired(clock)
    timers = IdleTimers(clock, fired)
    timers.arm("late", 100.0)
    timers.arm("early", 5.0)
    assert [5.0] == [call.getTime() for call in clock.getDelayedCalls()]
    clock.advance(5)
    assert [("early", 5.0)] == fired.log
    assert [100.0] == [call.getTime() for call in clock.getDelayedCalls()]


def test_disarmed_entries_never_fire_and_leave_no_timer(clock: Clock) -> None:
    fired = Fired(clock)
    timers = IdleTimers(clock, fired)
    first = timers.arm("first", 10.0)
    timers.arm("second", 20.0)
    timers.disarm(first)
    timers.disarm(first)  # twice is harmless
    clock.advance(10)  # the timer may come for the dead head: nothing fires
    assert [] == fired.log
    clock.advance(10)
    assert [("second", 20.0)] == fired.log
    third = timers.arm("third", 50.0)
    timers.disarm(third)
    assert [] == clock.getDelayedCalls() and timers.timer is None


def test_last_disarm_cancels_the_timer(clock: Clock) -> None:
    timers = IdleTimers(clock, Fired(clock))
    entries = [timers.arm(str(n), 300.0 + n) for n in range(5)]
    for entry in entries:
        timers.disarm(entry)
    assert [] == clock.getDelayedCalls() and 0 == len(timers)


def test_dead_entries_are_compacted(clock: Clock) -> None:
    """Sessions that come and go while others stay keep the heap bounded."""
    fired = Fired(clock)
    timers = IdleTimers(clock, fired)
    timers.arm("stays", 1000.0)
    for n in range(10_000):
        timers.disarm(timers.arm(f"brief{n}", 300.0 + n))
    assert len(timers._heap) <= 2 * 64 + 2
    clock.advance(1000)
    assert [("stays", 1000.0)] == fired.log


def test_expire_may_arm_again_without_delaying_others(clock: Clock) -> None:
    """An entry re-armed from expire() (input came meanwhile) fires at its
    new time, and an earlier entry still fires at its own."""
    log: list[tuple[str, float]] = []
    timers: IdleTimers

    def expire(session: str) -> None:
        log.append((session, clock.seconds()))
        if session == "busy" and clock.seconds() < 10:
            timers.arm("busy", 10.0)

    timers = IdleTimers(clock, expire)
    timers.arm("busy", 3.0)
    timers.arm("quiet", 5.0)
    clock.advance(3)
    clock.advance(2)
    clock.advance(5)
    assert [("busy", 3.0), ("quiet", 5.0), ("busy", 10.0)] == log


def test_an_expire_that_raises_keeps_the_others(clock: Clock) -> None:
    fired = Fired(clock)

    def fragile(session: str) -> None:
        if session == "bad":
            raise RuntimeError("boom")
        fired(session)

    timers = IdleTimers(clock, fragile)
    for name in ("first", "bad", "last"):
        timers.arm(name, 10.0)
    timers.arm("later", 20.0)
    with pytest.raises(RuntimeError):
        clock.advance(10)
    assert [("first", 10.0), ("last", 10.0)] == fired.log
    clock.advance(10)
    assert ("later", 20.0) == fired.log[-1]


# -- the protocol's idle timer on the factory's IdleTimers ---------------------


@pytest.fixture
def factory(clock: Clock) -> SMTPFactory:
    return SMTPFactory(MemoryHandler(), hostname="mx.test", reactor=clock)


def test_many_idle_sessions_share_one_timer_and_each_times_out_on_time(
    factory: SMTPFactory, clock: Clock
) -> None:
    """Ten sessions: one idle timer between them; each gets its 421 exactly
    300 seconds after its own last input."""
    clients = []
    for _ in range(10):
        client = connect(factory)
        client.replies()
        clients.append(client)
        clock.advance(7)
    lifetime = factory.session_deadlines.timer
    idle = [call for call in clock.getDelayedCalls() if call is not lifetime]
    assert 1 == len(idle)
    clients[0].command(b"NOOP")  # at 70: now due at 370
    starts = [7.0 * n for n in range(10)]
    starts[0] = 70.0
    for n, start in sorted(enumerate(starts), key=lambda item: item[1]):
        clock.advance(start + 300 - clock.seconds() - 0.5)
        assert not clients[n].closed
        clock.advance(0.5)
        assert clients[n].closed, n
        assert [TIMEOUT_421] == clients[n].replies()
        clients[n].protocol.connectionLost(None)
    assert [] == clock.getDelayedCalls()


def test_closed_sessions_leave_no_idle_timer(
    factory: SMTPFactory, clock: Clock
) -> None:
    for _ in range(3):
        client = connect(factory)
        client.replies()
        client.command(b"QUIT")
        assert client.closed
        client.protocol.connectionLost(None)
    assert [] == clock.getDelayedCalls()
    assert 0 == len(factory.idle_timers)


@pytest_twisted.inlineCallbacks
def test_real_reactor_sessions_time_out_and_leave_no_timer(listen):
    """On the real reactor, over TCP: three idle clients each get the 421,
    and once they are gone the factory holds no timer (a trial test that
    stops its listener leaves a clean reactor)."""
    port = listen(MemoryHandler(), limits=Limits(timeout=0.3))
    factory = listen.factories[-1]

    def idle_client() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            data = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    return data
                data += chunk

    replies = yield DeferredList(
        [threads.deferToThread(idle_client) for _ in range(3)],
        fireOnOneErrback=True,
    )
    for _, data in replies:
        assert data.startswith(b"220 ") and data.endswith(
            b"421 mx.test Timeout, closing connection\r\n"
        )
    for _ in range(100):
        if not factory.sessions:
            break
        yield task.deferLater(reactor, 0.02, lambda: None)
    assert not factory.sessions
    assert factory.idle_timers.timer is None and 0 == len(factory.idle_timers)


def test_a_timeout_that_rearms_another_session_due_with_it_leaves_one_entry() -> None:
    """A's timeout re-arms B while B's entry is out of the heap in the same
    batch: B's own expire, run next, is stale and must leave B's new entry
    alone (no second entry, nothing held once B is gone)."""
    clock = Clock()
    factory = SMTPFactory(MemoryHandler(), hostname="mx.test", reactor=clock)
    peers: dict[object, object] = {}

    class ResetsAnother(SMTPServerProtocol):
        def timeoutConnection(self) -> None:
            other = peers.get(self)
            if other is not None:
                other.setTimeout(None)  # what holding and resuming input do
                other.setTimeout(factory.limits.timeout)
            super().timeoutConnection()

    factory.protocol = ResetsAnother
    a, b = connect(factory), connect(factory)
    peers[a.protocol] = b.protocol
    clock.advance(factory.limits.timeout)
    assert a.closed and not b.closed
    assert 1 == len(factory.idle_timers)
    assert 1 == sum(entry[2] is b.protocol for entry in factory.idle_timers._heap)
    a.protocol.connectionLost(None)
    b.protocol.connectionLost(None)
    assert not [e for e in factory.idle_timers._heap if e[2] is b.protocol]
    assert 0 == len(factory.idle_timers) and factory.idle_timers.timer is None
