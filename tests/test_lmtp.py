"""LMTP (RFC 2033) over an in-memory transport with a fake clock."""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from twisted_smtpd import SMTPError, SMTPFactory
from twisted_smtpd.handlers import MemoryHandler
from twisted_smtpd.protocol import LMTPServerProtocol
from twisted_smtpd.testing import FakeClient, connect

BODY = b"Subject: t\r\n\r\nhi\r\n"


class Outcomes:
    """handle_message returns C{self.result} (a mapping or a plain value)."""

    def __init__(self, result: Any = None) -> None:
        self.result = result
        self.envelopes: list[Any] = []

    def check_recipient(self, envelope: Any, address: str, options: Any) -> None:
        if address.startswith("unknown"):
            raise SMTPError(550, "5.1.1", "No such user")

    def handle_message(self, envelope: Any) -> Any:
        self.envelopes.append(envelope)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def lmtp_client(handler: Any, clock: Clock, **kwargs: Any) -> FakeClient:
    factory = SMTPFactory(
        handler, hostname="mx.test", reactor=clock, lmtp=True, **kwargs
    )
    client = connect(factory)
    assert [b"220 mx.test LMTP twisted_smtpd ready"] == client.replies()
    return client


def envelope(client: FakeClient, *recipients: str) -> list[bytes]:
    assert b"250 " in client.command(b"LHLO relay.example")[-1]
    assert [b"250 2.1.0 Sender OK"] == client.command(b"MAIL FROM:<s@example.org>")
    return [client.command(b"RCPT TO:<%s>" % r.encode())[0] for r in recipients]


def data(client: FakeClient, body: bytes = BODY) -> list[bytes]:
    assert [b"354 End data with <CR><LF>.<CR><LF>"] == client.command(b"DATA")
    client.send(body + b".\r\n")
    return replies(client)


def replies(client: FakeClient) -> list[bytes]:
    """The replies, with the session's own message id shown as <id>."""
    return [
        re.sub(rb"queued as [0-9A-Z]+-\d+$", b"queued as <id>", line)
        for line in client.replies()
    ]


@pytest.fixture
def clock() -> Clock:
    return Clock()


class TestGreeting:
    def test_factory_builds_the_lmtp_protocol(self, clock: Clock) -> None:
        factory = SMTPFactory(MemoryHandler(), reactor=clock, lmtp=True)
        assert factory.protocol is LMTPServerProtocol

    def test_lhlo_lists_the_extensions(self, clock: Clock) -> None:
        client = lmtp_client(MemoryHandler(), clock)
        replies = client.command(b"LHLO relay.example")
        assert b"250-mx.test Hello relay.example" == replies[0]
        assert b"250-PIPELINING" in replies and b"250-ENHANCEDSTATUSCODES" in replies
        assert replies[-1].startswith(b"250 ")

    @pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
    def test_ehlo_and_helo_are_refused(self, clock: Clock, verb: bytes) -> None:
        """RFC 2033 4.1: an LMTP server speaks LHLO only."""
        client = lmtp_client(MemoryHandler(), clock)
        # Before LHLO: no enhanced status codes (RFC 2034).
        assert [b"500 This is an LMTP server: use LHLO"] == client.command(
            verb + b" relay.example"
        )
        # Not greeted: MAIL still needs LHLO.
        assert client.command(b"MAIL FROM:<s@example.org>")[0].startswith(b"503 ")

    def test_lhlo_in_smtp_is_unknown(self, clock: Clock) -> None:
        client = connect(
            SMTPFactory(MemoryHandler(), hostname="mx.test", reactor=clock)
        )
        client.replies()
        assert [b"500 Command not recognized"] == client.command(b"LHLO x")
        client.command(b"EHLO c.example")
        assert [b"500 5.5.2 Command not recognized"] == client.command(b"LHLO x")


class TestReplies:
    def test_one_reply_per_accepted_recipient_in_order(self, clock: Clock) -> None:
        """Refused at RCPT: no reply after DATA. Then each its own outcome."""
        handler = Outcomes(
            {
                "a@example.net": None,
                "b@example.net": SMTPError(452, "4.2.2", "Mailbox full"),
                "c@example.net": "Q9",
            }
        )
        client = lmtp_client(handler, clock)
        rcpt = envelope(
            client,
            "a@example.net",
            "unknown@example.net",
            "b@example.net",
            "c@example.net",
        )
        assert rcpt[1] == b"550 5.1.1 No such user"
        assert [
            b"250 2.0.0 <a@example.net> OK: queued as <id>",
            b"452 4.2.2 Mailbox full",
            b"250 2.0.0 <c@example.net> OK: queued as Q9",
        ] == data(client)
        (stored,) = handler.envelopes
        assert ["a@example.net", "b@example.net", "c@example.net"] == stored.rcpt_tos

    def test_plain_result_applies_to_all(self, clock: Clock) -> None:
        client = lmtp_client(Outcomes("ID1"), clock)
        envelope(client, "a@example.net", "b@example.net")
        assert [
            b"250 2.0.0 <a@example.net> OK: queued as ID1",
            b"250 2.0.0 <b@example.net> OK: queued as ID1",
        ] == data(client)

    def test_plain_refusal_applies_to_all(self, clock: Clock) -> None:
        client = lmtp_client(Outcomes(SMTPError(554, "5.7.1", "Spam")), clock)
        envelope(client, "a@example.net", "b@example.net")
        assert [b"554 5.7.1 Spam", b"554 5.7.1 Spam"] == data(client)

    def test_handler_crash_is_451_for_each(self, clock: Clock) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        try:
            client = lmtp_client(Outcomes(RuntimeError("boom")), clock)
            envelope(client, "a@example.net", "b@example.net")
            replies = data(client)
        finally:
            globalLogPublisher.removeObserver(events.append)
        assert [b"451 4.3.0 Requested action aborted: local error"] * 2 == replies
        assert 1 == sum("log_failure" in e for e in events)

    def test_waits_for_the_deferred(self, clock: Clock) -> None:
        """Replies only once the handler's Deferred fires; pipelined commands wait."""
        pending: Deferred[Any] = Deferred()
        handler = Outcomes(pending)
        client = lmtp_client(handler, clock)
        envelope(client, "a@example.net", "b@example.net")
        client.command(b"DATA")
        client.send(BODY + b".\r\nNOOP\r\n")
        assert [] == client.replies()
        pending.callback(
            {"a@example.net": None, "b@example.net": SMTPError(450, "4.2.1", "Later")}
        )
        assert [
            b"250 2.0.0 <a@example.net> OK: queued as <id>",
            b"450 4.2.1 Later",
            b"250 2.0.0 OK",
        ] == replies(client)

    def test_bdat_last_gives_one_reply_each(self, clock: Clock) -> None:
        client = lmtp_client(Outcomes(None), clock)
        envelope(client, "a@example.net", "b@example.net")
        client.send(b"BDAT %d LAST\r\n%s" % (len(BODY), BODY))
        assert [
            b"250 2.0.0 <a@example.net> OK: queued as <id>",
            b"250 2.0.0 <b@example.net> OK: queued as <id>",
        ] == replies(client)

    def test_duplicate_recipient_gets_two_replies(self, clock: Clock) -> None:
        """Each accepted RCPT is answered, a repeated address too."""
        client = lmtp_client(Outcomes({"a@example.net": None}), clock)
        envelope(client, "a@example.net", "a@example.net")
        assert [b"250 2.0.0 <a@example.net> OK: queued as <id>"] * 2 == data(client)

    def test_too_big_is_refused_for_each(self, clock: Clock) -> None:
        """552 after the data is a reply per recipient too (RFC 2033 4.2)."""
        from twisted_smtpd import Limits

        client = lmtp_client(Outcomes(None), clock, limits=Limits(max_message_size=10))
        envelope(client, "a@example.net", "b@example.net")
        assert [
            b"552 5.3.4 Message size exceeds fixed maximum message size"
        ] * 2 == data(client, b"x" * 100 + b"\r\n")

    def test_unsafe_outcomes_are_sanitised(self, clock: Clock) -> None:
        """Per-recipient refusals and queue ids pass the same wire checks."""
        result = {
            "a@example.net": "id with\r\nspace",
            "b@example.net": SMTPError(550, "5.1.1", "no\r\n250 smuggled"),
        }
        client = lmtp_client(Outcomes(result), clock)
        envelope(client, "a@example.net", "b@example.net")
        first, *rest = data(client)
        assert first.startswith(b"250 2.0.0 <a@example.net> OK: queued as ")
        assert b"\r" not in first and b" space" not in first
        assert all(not line.startswith(b"250") for line in rest)

    def test_received_header_says_lmtp(self, clock: Clock) -> None:
        """RFC 3848: the protocol in the trace is LMTP."""
        handler = MemoryHandler()
        client = lmtp_client(handler, clock)
        envelope(client, "a@example.net")
        data(client)
        (message,) = handler.messages
        assert b"with LMTP" in message.received_header

    def test_session_goes_on(self, clock: Clock) -> None:
        handler = Outcomes(None)
        client = lmtp_client(handler, clock)
        envelope(client, "a@example.net")
        data(client)
        assert [b"250 2.1.0 Sender OK"] == client.command(b"MAIL FROM:<s@example.org>")


class TestSMTPFolding:
    """Under SMTP a mapping becomes the single reply."""

    def smtp(self, handler: Any, clock: Clock) -> FakeClient:
        client = connect(SMTPFactory(handler, hostname="mx.test", reactor=clock))
        client.replies()
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<s@example.org>")
        client.command(b"RCPT TO:<a@example.net>")
        client.command(b"RCPT TO:<b@example.net>")
        return client

    def test_all_stored(self, clock: Clock) -> None:
        client = self.smtp(
            Outcomes({"a@example.net": "N1", "b@example.net": None}), clock
        )
        assert [b"250 2.0.0 OK: queued as N1"] == data(client)

    def test_a_refusal_is_the_reply(self, clock: Clock) -> None:
        result = {
            "a@example.net": None,
            "b@example.net": SMTPError(452, "4.3.1", "Full"),
        }
        client = self.smtp(Outcomes(result), clock)
        assert [b"452 4.3.1 Full"] == data(client)


class TestOptions:
    """twistd smtpd --lmtp, --handler-timeout and --maildir templates."""

    def test_lmtp_handler_timeout_and_template(
        self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from twisted_smtpd.handlers import MaildirHandler
        from twisted_smtpd.tap import build_factory

        from .test_tap import parse

        monkeypatch.chdir(tmp_path)
        options = parse("--lmtp", "--handler-timeout", "7", "--maildir", "m/{local}")
        factory = build_factory(options)
        assert factory.lmtp and factory.protocol is LMTPServerProtocol
        assert 7 == factory.limits.handler_timeout
        handler = options["handler_object"]
        assert isinstance(handler, MaildirHandler)
        assert str(tmp_path / "m" / "bob") == handler.maildir_for("bob@example.net")
        assert not (tmp_path / "m").exists()

    def test_defaults(self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        from twisted_smtpd.tap import build_factory

        from .test_tap import parse

        monkeypatch.chdir(tmp_path)
        factory = build_factory(parse())
        assert not factory.lmtp and factory.protocol is not LMTPServerProtocol
        assert 120 == factory.limits.handler_timeout

    @pytest.mark.parametrize(
        "args, error",
        [
            (
                ["--handler-timeout", "soon"],
                "--handler-timeout must be a whole number, not 'soon'",
            ),
            (["--handler-timeout", "-1"], "--handler-timeout must be at least 0"),
            (
                ["--maildir", "m/{user}"],
                "cannot use --maildir: unknown placeholder {user}",
            ),
        ],
    )
    def test_bad_values_are_one_line(
        self,
        tmp_path: Any,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        args: list[str],
        error: str,
    ) -> None:
        from .test_tap import parse_error

        monkeypatch.chdir(tmp_path)
        line = parse_error(capsys, *args)
        assert error in line and 1 == len(line.strip().splitlines())
