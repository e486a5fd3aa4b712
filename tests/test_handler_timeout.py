"""Hook deadlines (C{Limits.handler_timeout}, C{--handler-timeout})."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from twisted.internet.defer import AlreadyCalledError, CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from twisted_smtpd import Limits, SMTPFactory
from twisted_smtpd.testing import FakeClient, connect

BODY = b"Subject: t\r\n\r\nhi\r\n"
TIMEOUT = 30.0
R451 = b"451 4.3.0 Requested action aborted: handler timed out"


class Hanging:
    """Every hook named in C{hang} returns a Deferred that never fires (once)."""

    def __init__(self, *hang: str) -> None:
        self.hang = set(hang)
        self.pending: dict[str, Deferred[Any]] = {}
        self.cancelled: list[str] = []
        self.stored: list[Any] = []
        self.aborted = 0

    def _maybe_hang(self, name: str) -> Any:
        if name not in self.hang:
            return None
        self.hang.discard(name)

        def cancel(_: Any) -> None:
            self.cancelled.append(name)

        self.pending[name] = Deferred(cancel)
        return self.pending[name]

    def check_client(self, peer: Any) -> Any:
        return self._maybe_hang("check_client")

    def check_sender(self, envelope: Any) -> Any:
        return self._maybe_hang("check_sender")

    def check_recipient(self, envelope: Any, address: str, options: Any) -> Any:
        return self._maybe_hang("check_recipient")

    def open_message(self, envelope: Any) -> Any:
        return _Receiver(self, envelope)


class _Receiver:
    def __init__(self, handler: Hanging, envelope: Any) -> None:
        self.handler = handler
        self.envelope = envelope

    def write(self, data: bytes) -> None:
        pass

    def finish(self) -> Any:
        hung = self.handler._maybe_hang("finish")
        if hung is None:
            self.handler.stored.append(self.envelope)
        return hung

    def abort(self) -> None:
        self.handler.aborted += 1


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def logged() -> Any:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def client_for(handler: Any, clock: Clock, lmtp: bool = False) -> FakeClient:
    factory = SMTPFactory(
        handler,
        hostname="mx.test",
        reactor=clock,
        limits=Limits(handler_timeout=TIMEOUT),
        lmtp=lmtp,
    )
    return connect(factory)


def greet(client: FakeClient, lmtp: bool = False) -> None:
    client.replies()
    client.command(b"LHLO c.example" if lmtp else b"EHLO c.example")


def texts(events: list[dict]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events]


def test_default_is_120_seconds() -> None:
    assert 120.0 == Limits().handler_timeout


def test_check_sender(clock: Clock, logged: list) -> None:
    """MAIL's hook hangs: cancelled at the deadline, 451, the session goes on."""
    handler = Hanging("check_sender")
    client = client_for(handler, clock)
    greet(client)
    client.send(b"MAIL FROM:<s@example.org>\r\nNOOP\r\n")
    clock.advance(TIMEOUT - 1)
    assert [] == client.replies()
    clock.advance(1)
    assert [R451, b"250 2.0.0 OK"] == client.replies()
    assert ["check_sender"] == handler.cancelled
    assert not client.closed
    # No transaction was begun: MAIL again works and the message goes through.
    assert [b"250 2.1.0 Sender OK"] == client.command(b"MAIL FROM:<s@example.org>")
    assert [b"250 2.1.5 Recipient OK"] == client.command(b"RCPT TO:<b@example.net>")
    client.command(b"DATA")
    client.send(BODY + b".\r\n")
    assert client.replies()[0].startswith(b"250 ")
    assert any("check_sender" in t and "timed out" in t for t in texts(logged))
    # No traceback for a deadline: it is the handler's slowness, not a crash.
    assert not any("log_failure" in e for e in logged)


def test_check_recipient(clock: Clock) -> None:
    handler = Hanging("check_recipient")
    client = client_for(handler, clock)
    greet(client)
    client.command(b"MAIL FROM:<s@example.org>")
    client.send(b"RCPT TO:<b@example.net>\r\n")
    clock.advance(TIMEOUT)
    assert [R451] == client.replies()
    assert ["check_recipient"] == handler.cancelled
    # Not accepted: DATA needs a recipient.
    assert client.command(b"DATA")[0].startswith(b"503 ")
    assert [b"250 2.1.5 Recipient OK"] == client.command(b"RCPT TO:<b@example.net>")


def test_check_client_gets_421_and_close(clock: Clock) -> None:
    handler = Hanging("check_client")
    client = client_for(handler, clock)
    assert [] == client.replies()
    clock.advance(TIMEOUT)
    (reply,) = client.replies()
    assert reply.startswith(b"421 mx.test ")  # no EHLO: no enhanced code
    assert client.closed
    assert ["check_client"] == handler.cancelled


@pytest.mark.parametrize("lmtp", [False, True])
def test_finish(clock: Clock, lmtp: bool) -> None:
    """finish() hangs: cancelled, the receiver aborted, 451 (each recipient
    under LMTP), nothing stored; the next message is fine."""
    handler = Hanging("finish")
    client = client_for(handler, clock, lmtp)
    greet(client, lmtp)
    client.command(b"MAIL FROM:<s@example.org>")
    client.command(b"RCPT TO:<a@example.net>")
    client.command(b"RCPT TO:<b@example.net>")
    client.command(b"DATA")
    client.send(BODY + b".\r\n")
    clock.advance(TIMEOUT)
    assert [R451] * (2 if lmtp else 1) == client.replies()
    assert ["finish"] == handler.cancelled
    assert 1 == handler.aborted
    assert [] == handler.stored
    client.command(b"MAIL FROM:<s@example.org>")
    client.command(b"RCPT TO:<a@example.net>")
    client.command(b"DATA")
    client.send(BODY + b".\r\n")
    assert client.replies()[0].startswith(b"250 ")
    assert 1 == len(handler.stored)


@pytest.mark.parametrize("with_canceller", [False, True])
def test_late_result_is_ignored(clock: Clock, with_canceller: bool) -> None:
    """The hook is over at the deadline, whatever its canceller does, and a
    later result changes nothing (with a canceller that ignores the cancel,
    Twisted raises AlreadyCalledError in the handler's own late callback)."""
    late: Deferred[Any] = Deferred((lambda d: None) if with_canceller else None)

    class Late:
        def check_sender(self, envelope: Any) -> Any:
            return late

        def handle_message(self, envelope: Any) -> None:
            pass

    client = client_for(Late(), clock)
    greet(client)
    client.send(b"MAIL FROM:<s@example.org>\r\n")
    clock.advance(TIMEOUT)
    assert [R451] == client.replies()
    if with_canceller:
        with pytest.raises(AlreadyCalledError):
            late.callback(None)
    else:
        late.callback(None)
    assert [] == client.replies()
    # Not accepted: RCPT still needs MAIL.
    assert client.command(b"RCPT TO:<b@example.net>")[0].startswith(b"503 ")


def test_coroutine_is_cancelled(clock: Clock) -> None:
    """An async hook awaiting forever gets CancelledError at the deadline."""
    seen: list[str] = []
    never: Deferred[None] = Deferred()

    class Async:
        async def check_sender(self, envelope: Any) -> None:
            try:
                await never
            except (CancelledError, asyncio.CancelledError):
                seen.append("cancelled")
                raise

        def handle_message(self, envelope: Any) -> None:
            pass

    client = client_for(Async(), clock)
    greet(client)
    client.send(b"MAIL FROM:<s@example.org>\r\n")
    clock.advance(TIMEOUT)
    assert [R451] == client.replies()
    assert ["cancelled"] == seen


def test_no_deadline_left_behind(clock: Clock) -> None:
    """A hook that answers in time leaves no timer running."""
    pending: Deferred[None] = Deferred()

    class Slow:
        def check_sender(self, envelope: Any) -> Any:
            return pending

        def handle_message(self, envelope: Any) -> None:
            pass

    client = client_for(Slow(), clock)
    greet(client)
    client.send(b"MAIL FROM:<s@example.org>\r\n")
    assert [TIMEOUT] == deadlines(clock, pending)
    pending.callback(None)
    assert [b"250 2.1.0 Sender OK"] == client.replies()
    assert [] == deadlines(clock, pending)


def deadlines(clock: Clock, hook: Deferred[Any]) -> list[float]:
    """Seconds left on the timers that would cancel C{hook}."""
    return [
        call.getTime() - clock.seconds()
        for call in clock.getDelayedCalls()
        if call.func == hook.cancel
    ]


def test_zero_means_no_deadline(clock: Clock) -> None:
    handler = Hanging("check_sender")
    factory = SMTPFactory(
        handler, hostname="mx.test", reactor=clock, limits=Limits(handler_timeout=0)
    )
    client = connect(factory)
    greet(client)
    client.send(b"MAIL FROM:<s@example.org>\r\n")
    assert [] == deadlines(clock, handler.pending["check_sender"])
    clock.advance(10_000)
    assert [] == client.replies()
