"""The handler's C{transaction_abandoned} hook: once for every transaction
that began (MAIL accepted) and ended before its message was handed over;
never after a message was."""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from twisted_smtpd import Limits, SMTPError, SMTPFactory
from twisted_smtpd._delivery import HandlerHooks, _CollectingReceiver
from twisted_smtpd.testing import FakeClient, connect

LOST = Failure(ConnectionDone())
BODY = b"Subject: t\r\n\r\nhi\r\n.\r\n"


class Whole:
    """The whole-message form, recording what it was told."""

    def __init__(self) -> None:
        self.senders: list[Any] = []  # the envelopes check_sender saw
        self.abandoned: list[Any] = []
        self.messages: list[Any] = []
        self.pending_sender: Optional[Deferred[None]] = None
        self.pending_message: Optional[Deferred[None]] = None

    def check_sender(self, envelope: Any) -> Any:
        self.senders.append(envelope)
        if envelope.mail_from.startswith("refused"):
            raise SMTPError(550, "5.7.1", "No")
        if envelope.mail_from.startswith("slow"):
            self.pending_sender = Deferred()
            return self.pending_sender
        return None

    def handle_message(self, envelope: Any) -> Any:
        self.messages.append(envelope)
        if b"slow" in envelope.content:
            self.pending_message = Deferred()
            return self.pending_message
        return None

    def transaction_abandoned(self, envelope: Any) -> None:
        self.abandoned.append(envelope)


class Streaming(Whole):
    """The streaming form: its receiver hears the end of a message."""

    def __init__(self) -> None:
        super().__init__()
        self.aborted = 0

    def open_message(self, envelope: Any) -> Any:
        if envelope.mail_from.startswith("open-fails"):
            raise SMTPError(452, "4.3.1", "Full")
        handler = self

        class Receiver:
            def write(self, data: bytes) -> None:
                pass

            def finish(self) -> None:
                handler.messages.append(envelope)

            def abort(self) -> None:
                handler.aborted += 1

        return Receiver()


def start(
    handler: Any, clock: Optional[Clock] = None, lmtp: bool = False, **limits: Any
) -> FakeClient:
    factory = SMTPFactory(
        handler,
        hostname="mx.test",
        reactor=clock or Clock(),
        limits=Limits(**limits),
        lmtp=lmtp,
    )
    client = connect(factory)
    client.replies()
    client.command(b"LHLO c.example" if lmtp else b"EHLO c.example")
    return client


def open_transaction(client: FakeClient, sender: bytes = b"a@example.org") -> None:
    assert [b"250 2.1.0 Sender OK"] == client.command(b"MAIL FROM:<%s>" % sender)
    assert [b"250 2.1.5 Recipient OK"] == client.command(b"RCPT TO:<b@example.net>")


def lose(client: FakeClient) -> None:
    """The connection is lost (once: as a real transport does)."""
    if not getattr(client, "lost", False):
        client.lost = True  # type: ignore[attr-defined]
        client.protocol.connectionLost(LOST)


# -- the ends of a transaction before DATA ------------------------------------
ENDS: dict[str, Callable[[FakeClient, Clock], Any]] = {
    "RSET": lambda client, clock: client.command(b"RSET"),
    "EHLO": lambda client, clock: client.command(b"EHLO again.example"),
    "HELO": lambda client, clock: client.command(b"HELO again.example"),
    "QUIT": lambda client, clock: (client.command(b"QUIT"), lose(client)),
    "lost": lambda client, clock: lose(client),
    "idle timeout": lambda client, clock: (clock.advance(301), lose(client)),
    "shutdown": lambda client, clock: (
        client.protocol.factory.shutdown(),
        lose(client),
    ),
    "too many errors": lambda client, clock: (
        [client.command(b"FROB") for _ in range(10)],
        lose(client),
    ),
    "session time limit": lambda client, clock: (
        client.protocol._session_expired(),
        lose(client),
    ),
}


@pytest.mark.parametrize("end", list(ENDS))
@pytest.mark.parametrize("kind", [Whole, Streaming])
def test_each_end_before_data_is_told_once(kind: type, end: str) -> None:
    """Every way a transaction ends before DATA: called once, with the
    envelope check_sender saw (the recipients accepted in it)."""
    handler = kind()
    clock = Clock()
    client = start(handler, clock)
    open_transaction(client)
    assert [] == handler.abandoned
    ENDS[end](client, clock)
    assert handler.senders == handler.abandoned
    assert ["b@example.net"] == handler.abandoned[0].rcpt_tos
    # Nothing more is told for it: later commands, the connection's end.
    if not client.closed:
        client.command(b"RSET")
        client.command(b"NOOP")
        lose(client)
    assert handler.senders == handler.abandoned


def test_lhlo_ends_an_lmtp_transaction() -> None:
    handler = Whole()
    client = start(handler, lmtp=True)
    open_transaction(client)
    client.command(b"LHLO again.example")
    assert handler.senders == handler.abandoned


def test_told_before_the_next_transaction_begins() -> None:
    """Pipelined RSET and MAIL: the old transaction is told first."""
    order: list[tuple[str, Any]] = []

    class Ordered(Whole):
        def check_sender(self, envelope: Any) -> Any:
            order.append(("sender", envelope))
            return super().check_sender(envelope)

        def transaction_abandoned(self, envelope: Any) -> None:
            order.append(("abandoned", envelope))
            super().transaction_abandoned(envelope)

    handler = Ordered()
    client = start(handler)
    open_transaction(client)
    client.send(b"RSET\r\nMAIL FROM:<second@example.org>\r\n")
    first, second = handler.senders
    assert [("sender", first), ("abandoned", first), ("sender", second)] == order


def test_a_transaction_that_never_began_is_not_told() -> None:
    """MAIL refused, or no MAIL at all: nothing to abandon."""
    handler = Whole()
    client = start(handler)
    assert client.command(b"MAIL FROM:<refused@example.org>")[0].startswith(b"550")
    client.command(b"RSET")
    client.command(b"EHLO again.example")
    client.command(b"QUIT")
    lose(client)
    assert [] == handler.abandoned


def test_tls_xclient_and_auth_are_refused_inside_a_transaction() -> None:
    """They cannot end a transaction, so they tell nothing."""
    handler = Whole()
    client = start(handler)
    open_transaction(client)
    for verb in (b"STARTTLS", b"XCLIENT ADDR=192.0.2.9", b"AUTH PLAIN"):
        assert client.command(verb)[0][:3] in (b"502", b"503"), verb
    assert [] == handler.abandoned
    lose(client)
    assert handler.senders == handler.abandoned


def test_each_transaction_of_a_session_is_told_separately() -> None:
    handler = Whole()
    client = start(handler)
    for _ in range(3):
        open_transaction(client)
        client.command(b"RSET")
    assert 3 == len(handler.abandoned)
    assert handler.senders == handler.abandoned
    assert 3 == len({id(envelope) for envelope in handler.abandoned})


# -- delivered messages are never told ----------------------------------------
@pytest.mark.parametrize("kind", [Whole, Streaming])
@pytest.mark.parametrize("lmtp", [False, True])
def test_a_delivered_message_is_not_told(kind: type, lmtp: bool) -> None:
    handler = kind()
    client = start(handler, lmtp=lmtp)
    open_transaction(client)
    client.command(b"DATA")
    assert client.command(BODY[:-2])[-1].startswith(b"250")
    assert 1 == len(handler.messages)
    client.command(b"RSET")
    client.command(b"QUIT")
    lose(client)
    assert [] == handler.abandoned


@pytest.mark.parametrize("streaming", [False, True])
def test_a_message_refused_at_the_end_is_not_told(streaming: bool) -> None:
    """handle_message/finish() refusing is the handler's own answer."""

    class Refusing(Streaming if streaming else Whole):  # type: ignore[misc]
        def handle_message(self, envelope: Any) -> None:
            raise SMTPError(554, "5.6.0", "No")

        def open_message(self, envelope: Any) -> Any:
            receiver = super().open_message(envelope)
            receiver.finish = lambda: self.handle_message(envelope)
            return receiver

    if not streaming:
        del Refusing.open_message
    handler = Refusing()
    client = start(handler)
    open_transaction(client)
    client.command(b"DATA")
    assert [b"554 5.6.0 No"] == client.command(BODY[:-2])
    lose(client)
    assert [] == handler.abandoned


def test_bdat_message_delivered_is_not_told() -> None:
    handler = Whole()
    client = start(handler)
    open_transaction(client)
    client.send(b"BDAT 4\r\nab\r\n")
    assert client.command(b"BDAT 0 LAST")[-1].startswith(b"250")
    lose(client)
    assert [] == handler.abandoned


def test_connection_lost_while_handle_message_pending_is_not_told() -> None:
    """The message was handed over: the end is handle_message's business."""
    handler = Whole()
    client = start(handler)
    open_transaction(client)
    client.command(b"DATA")
    client.send(b"slow\r\n.\r\n")
    assert handler.pending_message is not None
    lose(client)
    handler.pending_message.callback(None)
    assert [] == handler.abandoned


# -- messages dropped on the way ----------------------------------------------
DROPS: dict[str, Callable[[FakeClient], Any]] = {
    "lost during DATA": lambda client: (
        client.command(b"DATA"),
        client.send(b"part of it\r\n"),
        lose(client),
    ),
    "too big": lambda client: (
        client.command(b"DATA"),
        client.send(b"x" * 200 + b"\r\n.\r\n"),
    ),
    "too big in BDAT": lambda client: client.send(b"BDAT 200 LAST\r\n" + b"x" * 200),
    "RSET between BDAT chunks": lambda client: (
        client.send(b"BDAT 4\r\nab\r\n"),
        client.command(b"RSET"),
    ),
    "EHLO between BDAT chunks": lambda client: (
        client.send(b"BDAT 4\r\nab\r\n"),
        client.command(b"EHLO again.example"),
    ),
    "lost between BDAT chunks": lambda client: (
        client.send(b"BDAT 4\r\nab\r\n"),
        lose(client),
    ),
}


@pytest.mark.parametrize("drop", list(DROPS))
def test_whole_form_message_dropped_on_the_way_is_told_once(drop: str) -> None:
    """handle_message never came: the whole-message handler is told."""
    handler = Whole()
    client = start(handler, max_message_size=100)
    open_transaction(client)
    DROPS[drop](client)
    assert [] == handler.messages
    assert handler.senders == handler.abandoned
    lose(client)
    assert handler.senders == handler.abandoned


@pytest.mark.parametrize("drop", list(DROPS))
def test_streaming_form_hears_abort_instead(drop: str) -> None:
    """open_message was called: the receiver's abort() tells the end."""
    handler = Streaming()
    client = start(handler, max_message_size=100)
    open_transaction(client)
    DROPS[drop](client)
    lose(client)
    assert 1 == handler.aborted
    assert [] == handler.abandoned


def test_open_message_refusing_is_not_told() -> None:
    """open_message was called (and refused): the handler knows."""
    handler = Streaming()
    client = start(handler)
    open_transaction(client, b"open-fails@example.org")
    assert client.command(b"DATA")[0].startswith(b"452")
    lose(client)
    assert [] == handler.abandoned


# -- a sender accepted once the connection is gone ------------------------------
def test_sender_accepted_after_the_connection_was_lost_is_told() -> None:
    handler = Whole()
    client = start(handler)
    client.command(b"MAIL FROM:<slow@example.org>")
    assert handler.pending_sender is not None
    lose(client)
    assert [] == handler.abandoned  # no transaction yet
    handler.pending_sender.callback(None)
    assert handler.senders == handler.abandoned


def test_sender_accepted_while_closing_is_told_once() -> None:
    """Closed (force_close) before the answer, lost after it: once."""
    handler = Whole()
    client = start(handler)
    client.command(b"MAIL FROM:<slow@example.org>")
    assert handler.pending_sender is not None
    client.protocol.force_close()
    handler.pending_sender.callback(None)
    assert handler.senders == handler.abandoned
    lose(client)
    assert handler.senders == handler.abandoned


# -- a recipient still being checked when the connection goes -----------------------
class Reserving(Whole):
    """Reserves each recipient its check_recipient accepts (when its Deferred
    fires) and releases what the hook's envelope lists: what it reserved
    must be released, whenever check_recipient answers."""

    def __init__(self) -> None:
        super().__init__()
        self.reserved: set[str] = set()
        self.pending_rcpt: Optional[Deferred[None]] = None

    def check_recipient(self, envelope: Any, address: str, options: Any) -> Any:
        self.pending_rcpt = Deferred()
        self.pending_rcpt.addCallback(lambda _: self.reserved.add(address))
        return self.pending_rcpt

    def transaction_abandoned(self, envelope: Any) -> None:
        super().transaction_abandoned(envelope)
        self.reserved -= set(envelope.rcpt_tos)


RCPT_ANSWERS: dict[str, Callable[[Deferred[None], Clock], Any]] = {
    "accepts": lambda pending, clock: pending.callback(None),
    "refuses": lambda pending, clock: pending.errback(
        SMTPError(550, "5.1.1", "No such user")
    ),
    "fails": lambda pending, clock: pending.errback(RuntimeError("broke")),
    "is cut off by the deadline": lambda pending, clock: clock.advance(31),
}


@pytest.mark.parametrize("answer", list(RCPT_ANSWERS))
def test_recipient_pending_at_the_close_is_told_once_it_answers(answer: str) -> None:
    """The client is gone while check_recipient still answers: the
    transaction is told once that answer is in, with the recipient if it
    was accepted, so what check_recipient reserved is released."""
    handler = Reserving()
    clock = Clock()
    client = start(handler, clock, handler_timeout=30)
    client.command(b"MAIL FROM:<a@example.org>")
    client.send(b"RCPT TO:<b@example.net>\r\n")
    assert handler.pending_rcpt is not None
    lose(client)
    assert [] == handler.abandoned  # not yet: the answer may add b@
    RCPT_ANSWERS[answer](handler.pending_rcpt, clock)
    assert handler.senders == handler.abandoned
    expected = ["b@example.net"] if answer == "accepts" else []
    assert expected == handler.abandoned[0].rcpt_tos
    assert set() == handler.reserved
    clock.advance(60)
    assert 1 == len(handler.abandoned)


def test_recipient_that_never_answers_without_a_deadline_is_never_told() -> None:
    """handler_timeout=0 and a check_recipient that never answers: the
    transaction never ends for the handler (documented)."""
    handler = Reserving()
    clock = Clock()
    client = start(handler, clock, handler_timeout=0)
    client.command(b"MAIL FROM:<a@example.org>")
    client.send(b"RCPT TO:<b@example.net>\r\n")
    lose(client)
    clock.advance(3600)
    assert [] == handler.abandoned


def test_name_lookup_pending_at_the_close_is_told_once_it_ends() -> None:
    """DATA waits for the client's name when the connection goes: told
    once (when the name comes), and no message is opened."""
    lookups: dict[str, Deferred[str]] = {}

    class Names:
        def lookup(self, host: str) -> Deferred[str]:
            lookups[host] = Deferred()
            return lookups[host]

    handler = Whole()
    factory = SMTPFactory(
        handler, hostname="mx.test", reactor=Clock(), reverse_dns=Names()
    )
    client = connect(factory)
    client.command(b"EHLO c.example")
    open_transaction(client)
    assert [] == client.command(b"DATA")
    lose(client)
    lookups["192.0.2.1"].callback("host.example.test")
    assert handler.senders == handler.abandoned
    assert [] == handler.messages


class Tolerant(Whole):
    """A check_sender that, cancelled by its deadline, says "done" anyway."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form

    def check_sender(self, envelope: Any) -> Any:
        self.senders.append(envelope)
        if self.form == "canceller":
            return Deferred(lambda pending: pending.callback(None))

        async def swallows() -> None:
            try:
                await Deferred()
            except CancelledError:
                return None  # (released here: the place to)

        return swallows()


@pytest.mark.parametrize("form", ["canceller", "coroutine"])
def test_sender_cut_off_by_the_deadline_is_never_told(form: str) -> None:
    """The deadline answers 451, whatever the cancelled check_sender then
    gives: no transaction began, so none is told (documented)."""
    handler = Tolerant(form)
    clock = Clock()
    client = start(handler, clock, handler_timeout=5)
    client.command(b"MAIL FROM:<a@example.org>")
    clock.advance(6)
    assert client.replies()[0].startswith(b"451 4.3.0")
    assert client.command(b"RCPT TO:<b@example.net>")[0].startswith(b"503")
    client.command(b"QUIT")
    lose(client)
    assert 1 == len(handler.senders) and [] == handler.abandoned


# -- the hook's own outcome -------------------------------------------------------
@pytest.fixture
def logged() -> Any:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def failures(events: list[dict]) -> list[str]:
    return [
        event["log_failure"].getErrorMessage()
        for event in events
        if "log_failure" in event
        and "transaction_abandoned" in event.get("log_format", "")
    ]


class Failing(Whole):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.later: Deferred[None] = Deferred()

    def transaction_abandoned(self, envelope: Any) -> Any:
        super().transaction_abandoned(envelope)
        if self.how == "raises":
            raise RuntimeError("cleanup broke")
        if self.how == "coroutine":

            async def fails() -> None:
                raise RuntimeError("async cleanup broke")

            return fails()
        return self.later  # "deferred": fails later


@pytest.mark.parametrize("how", ["raises", "coroutine", "deferred"])
def test_a_failing_hook_is_logged_and_the_session_goes_on(
    how: str, logged: list[dict]
) -> None:
    handler = Failing(how)
    client = start(handler)
    open_transaction(client)
    assert [b"250 2.0.0 Reset OK"] == client.command(b"RSET")
    if how == "deferred":
        assert [] == failures(logged)  # not waited for: RSET answered already
        handler.later.errback(RuntimeError("late cleanup broke"))
    assert 1 == len(failures(logged))
    open_transaction(client)
    client.command(b"DATA")
    assert client.command(BODY[:-2])[-1].startswith(b"250")
    assert 1 == len(handler.abandoned)


def test_a_slow_hook_holds_nothing() -> None:
    """A pending Deferred from the hook: the next transaction goes on."""
    handler = Failing("deferred")
    client = start(handler)
    open_transaction(client)
    client.command(b"RSET")
    open_transaction(client)
    client.command(b"DATA")
    assert client.command(BODY[:-2])[-1].startswith(b"250")
    handler.later.callback(None)


# -- absent hook: nothing runs ---------------------------------------------------
def test_without_the_hook_nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hook: no check reaches the abandoning path, and the whole form
    uses the plain collecting receiver."""

    class Plain:
        def check_sender(self, envelope: Any) -> None:
            pass

        def handle_message(self, envelope: Any) -> None:
            pass

    hooks = HandlerHooks(Plain())
    assert hooks.transaction_abandoned is None
    assert type(hooks.open_message(object())) is _CollectingReceiver

    from twisted_smtpd.protocol import SMTPServerProtocol

    def never(self: Any) -> None:
        raise AssertionError("_abandon ran without a hook")

    monkeypatch.setattr(SMTPServerProtocol, "_abandon", never)
    client = start(Plain())
    open_transaction(client)
    client.command(b"RSET")
    open_transaction(client)
    client.command(b"EHLO again.example")
    open_transaction(client)
    lose(client)


def test_the_web_catcher_passes_the_hook_on(tmp_path: Any) -> None:
    """--web in front of --deliver: the wrapped handler is still told."""
    from twisted_smtpd.web.catcher import CatcherHandler
    from twisted_smtpd.web.store import MessageStore

    handler = Whole()
    client = start(CatcherHandler(handler, MessageStore()))
    open_transaction(client)
    client.command(b"RSET")
    assert handler.senders == handler.abandoned
