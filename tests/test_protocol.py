"""Protocol tests over an in-memory transport with a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from twisted_smtpd import Limits, SMTPError, SMTPFactory
from twisted_smtpd.handlers import MemoryHandler
from twisted_smtpd.testing import FakeClient, TLSStringTransport, connect


def transaction(client: FakeClient, body: bytes = b"Subject: t\r\n\r\nhi\r\n") -> list:
    client.command(b"EHLO client.example")
    assert [b"250 2.1.0 Sender OK"] == client.command(b"MAIL FROM:<a@example.org>")
    assert [b"250 2.1.5 Recipient OK"] == client.command(b"RCPT TO:<b@example.net>")
    assert [b"354 End data with <CR><LF>.<CR><LF>"] == client.command(b"DATA")
    client.send(body + b".\r\n")
    return client.replies()


class TestGreeting:
    def test_banner(self, factory: SMTPFactory) -> None:
        """The greeting is 220 with the hostname and app name."""
        client = connect(factory)
        assert [b"220 mx.test ESMTP twisted_smtpd ready"] == client.replies()

    def test_ehlo_keywords(self, client: FakeClient) -> None:
        """EHLO lists the extensions the server implements (DSN only where the
        handler honours it: see tests/test_hardening.py)."""
        assert [
            b"250-mx.test Hello client.example",
            b"250-PIPELINING",
            b"250-SIZE 33554432",
            b"250-8BITMIME",
            b"250-CHUNKING",
            b"250-ENHANCEDSTATUSCODES",
            b"250-SMTPUTF8",
            b"250 HELP",
        ] == client.command(b"EHLO client.example")

    def test_helo_has_no_enhanced_codes(self, client: FakeClient) -> None:
        """After HELO, replies carry no enhanced status code (RFC 2034)."""
        assert [b"250 mx.test Hello client.example"] == client.command(
            b"HELO client.example"
        )
        assert [b"250 Sender OK"] == client.command(b"MAIL FROM:<a@b.example>")

    def test_ehlo_without_domain(self, client: FakeClient) -> None:
        """EHLO with no domain is a syntax error."""
        assert [b"501 Syntax: HELO/EHLO domain"] == client.command(b"EHLO")

    def test_size_zero_means_unlimited(
        self, memory: MemoryHandler, clock: Clock
    ) -> None:
        """A zero size limit is advertised as plain SIZE."""
        factory = SMTPFactory(
            memory, hostname="mx.test", reactor=clock, limits=Limits(max_message_size=0)
        )
        client = connect(factory)
        client.replies()
        assert b"250-SIZE" in client.command(b"EHLO c.example")


class TestSequence:
    def test_protocol_runs_exactly_the_known_verbs(self) -> None:
        """The session's verb table and the protocol's commands agree.

        A do_X without a row in the state table would always get 503; a verb
        in the table without a do_X would get 500.
        """
        from twisted_smtpd._session import KNOWN_VERBS
        from twisted_smtpd.protocol import SMTPServerProtocol

        # BDAT is read by its own path: its chunk follows even when refused.
        assert KNOWN_VERBS == set(SMTPServerProtocol._COMMANDS) | {"BDAT"}

    @pytest.mark.parametrize(
        "line, expected",
        [
            (b"MAIL FROM:<a@b.example>", b"503 Send HELO/EHLO first"),
            (b"RCPT TO:<a@b.example>", b"503 Send HELO/EHLO first"),
            (b"DATA", b"503 Send HELO/EHLO first"),
        ],
    )
    def test_before_helo(
        self, client: FakeClient, line: bytes, expected: bytes
    ) -> None:
        """Transaction commands before HELO/EHLO get 503."""
        assert [expected] == client.command(line)

    def test_rcpt_before_mail(self, client: FakeClient) -> None:
        """RCPT without MAIL gets 503 5.5.1."""
        client.command(b"EHLO c.example")
        assert [b"503 5.5.1 Need MAIL before RCPT"] == client.command(
            b"RCPT TO:<a@b.c>"
        )

    def test_nested_mail(self, client: FakeClient) -> None:
        """A second MAIL in a transaction gets 503."""
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        assert [b"503 5.5.1 Sender already specified"] == client.command(
            b"MAIL FROM:<a@b.example>"
        )

    def test_data_without_rcpt(self, client: FakeClient) -> None:
        """DATA with a sender but no recipient gets 503."""
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        assert [b"503 5.5.1 Need RCPT before DATA"] == client.command(b"DATA")

    def test_unknown_verb(self, client: FakeClient) -> None:
        """Unknown verbs get 500 and the session goes on."""
        assert [b"500 Command not recognized"] == client.command(b"FROB x")
        assert [b"250 OK"] == client.command(b"NOOP")

    def test_rset_keeps_greeting(self, client: FakeClient) -> None:
        """RSET aborts the transaction but not the greeting."""
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        assert [b"250 2.0.0 Reset OK"] == client.command(b"RSET")
        assert [b"250 2.1.0 Sender OK"] == client.command(b"MAIL FROM:<>")

    def test_vrfy_and_help(self, client: FakeClient) -> None:
        """VRFY answers 252 (no enumeration); HELP answers 214; EXPN 502."""
        client.command(b"EHLO c.example")
        assert client.command(b"VRFY bob")[0].startswith(b"252 2.5.2 ")
        assert client.command(b"HELP")[0].startswith(b"214 2.0.0 ")
        assert [b"502 5.5.1 Command not implemented"] == client.command(b"EXPN list")
        assert [b"501 5.5.4 Syntax: VRFY address"] == client.command(b"VRFY")

    def test_quit(self, client: FakeClient) -> None:
        """QUIT gets 221 and the connection closes."""
        assert [b"221 Bye"] == client.command(b"QUIT")
        assert client.closed

    def test_too_many_bad_commands(self, memory: MemoryHandler, clock: Clock) -> None:
        """After the bad-command budget the server says 421 and closes."""
        factory = SMTPFactory(
            memory, hostname="mx.test", reactor=clock, limits=Limits(max_bad_commands=3)
        )
        client = connect(factory)
        client.replies()
        client.command(b"BOGUS")
        client.command(b"BOGUS")
        assert [
            b"500 Command not recognized",
            b"421 mx.test Too many errors, closing connection",
        ] == client.command(b"BOGUS")
        assert client.closed


class TestMailRcpt:
    def test_size_over_limit(self, client: FakeClient) -> None:
        """MAIL SIZE= above the limit gets 552 5.3.4."""
        client.command(b"EHLO c.example")
        assert [
            b"552 5.3.4 Message size exceeds fixed maximum message size"
        ] == client.command(b"MAIL FROM:<a@b.example> SIZE=999999999999")

    def test_unknown_parameter(self, client: FakeClient) -> None:
        """Unknown MAIL parameters get 555."""
        client.command(b"EHLO c.example")
        assert [b"555 5.5.4 Parameter FOO not recognized"] == client.command(
            b"MAIL FROM:<a@b.example> FOO=bar"
        )

    def test_malformed_address(self, client: FakeClient) -> None:
        """A malformed sender gets 501 5.1.7."""
        client.command(b"EHLO c.example")
        assert [b"501 5.1.7 Bad sender address syntax"] == client.command(
            b"MAIL FROM:<a@@b>"
        )

    def test_max_recipients(self, memory: MemoryHandler, clock: Clock) -> None:
        """Recipients beyond the limit get 452 4.5.3; earlier ones stand."""
        factory = SMTPFactory(
            memory, hostname="mx.test", reactor=clock, limits=Limits(max_recipients=2)
        )
        client = connect(factory)
        client.replies()
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        client.command(b"RCPT TO:<1@b.example>")
        client.command(b"RCPT TO:<2@b.example>")
        assert [b"452 4.5.3 Too many recipients"] == client.command(
            b"RCPT TO:<3@b.example>"
        )
        client.command(b"DATA")
        client.send(b"x\r\n.\r\n")
        assert ["1@b.example", "2@b.example"] == memory.messages[0].rcpt_tos

    def test_smtputf8(self, client: FakeClient) -> None:
        """Non-ASCII addresses are accepted with SMTPUTF8, refused without."""
        client.command(b"EHLO c.example")
        assert [b"553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter"] == (
            client.command("MAIL FROM:<jos\u00e9@b.example>".encode())
        )
        assert [b"250 2.1.0 Sender OK"] == client.command(
            "MAIL FROM:<jos\u00e9@b.example> SMTPUTF8".encode()
        )
        assert [b"250 2.1.5 Recipient OK"] == client.command(
            "RCPT TO:<\u00fc@\u00e9.example>".encode()
        )


class TestLines:
    def test_long_line_session_continues(self, client: FakeClient) -> None:
        """A command line over 512 octets gets 500 5.5.2 and the session goes on."""
        client.command(b"EHLO c.example")
        assert [b"500 5.5.2 Line too long"] == client.command(b"NOOP " + b"x" * 600)
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")

    def test_parameter_limit_below_command_limit(
        self, memory: MemoryHandler, clock: Clock
    ) -> None:
        """A MAIL line over a parameter limit set below the command limit is
        500 5.5.2 even though it is within the command limit."""
        factory = SMTPFactory(
            memory,
            hostname="mx.test",
            reactor=clock,
            limits=Limits(max_command_line=512, max_parameter_line=64),
        )
        client = connect(factory)
        client.replies()
        client.command(b"EHLO client.example")
        line = b"MAIL FROM:<a@example.org> SIZE=10"
        assert [b"250 2.1.0 Sender OK"] == client.command(line)
        client.command(b"RSET")
        long_line = b"MAIL FROM:<" + b"a" * 50 + b"@example.org>"
        assert [b"500 5.5.2 Line too long"] == client.command(long_line)
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP " + b"x" * 100)

    def test_huge_line_is_discarded_to_crlf(self, client: FakeClient) -> None:
        """A line longer than any buffer is dropped up to its CRLF, then 500."""
        client.command(b"EHLO c.example")
        client.send(b"X" * 20000)
        client.send(b"Y" * 20000 + b"\r")
        client.send(b"\nNOOP\r\n")
        assert [b"500 5.5.2 Line too long", b"250 2.0.0 OK"] == client.replies()

    def test_bare_lf_does_not_split_commands(self, client: FakeClient) -> None:
        """A bare LF never ends a command (smuggling defence)."""
        client.command(b"EHLO c.example")
        replies = client.command(b"NOOP\nQUIT")
        assert [b"500 5.5.2 Command not recognized"] == replies
        assert not client.closed


class TestData:
    def test_message_delivered(self, client: FakeClient, memory: MemoryHandler) -> None:
        """A message is handed to the handler whole, with 250 and a queue id."""
        replies = transaction(client, b"Subject: t\r\n\r\n..dot\r\nline\r\n")
        assert 1 == len(replies) and replies[0].startswith(b"250 2.0.0 OK: queued as ")
        envelope = memory.messages[0]
        assert b"Subject: t\r\n\r\n.dot\r\nline\r\n" == envelope.content
        assert "a@example.org" == envelope.mail_from
        assert ["b@example.net"] == envelope.rcpt_tos
        assert envelope.received_header.startswith(b"Received: from client.example")
        assert (
            b"with ESMTP id " + envelope.message_id.encode() in envelope.received_header
        )

    def test_bare_lf_dot_does_not_end_data(
        self, client: FakeClient, memory: MemoryHandler
    ) -> None:
        """<LF>.<LF> and <LF>.<CR><LF> stay in the message (SMTP smuggling)."""
        transaction(
            client,
            b"a\n.\nMAIL FROM:<evil@x.example>\r\nb\n.\r\nc\r.\r\n",
        )
        assert b"a\n.\nMAIL FROM:<evil@x.example>\r\nb\n.\r\nc\r.\r\n" == (
            memory.messages[0].content
        )

    def test_too_big(self, memory: MemoryHandler, clock: Clock) -> None:
        """Over the size limit: read to the end, one 552, nothing delivered."""
        factory = SMTPFactory(
            memory,
            hostname="mx.test",
            reactor=clock,
            limits=Limits(max_message_size=10),
        )
        client = connect(factory)
        client.replies()
        replies = transaction(client, b"0123456789abcdef\r\nRCPT TO:<x@y.example>\r\n")
        assert [b"552 5.3.4 Message size exceeds fixed maximum message size"] == replies
        assert [] == memory.messages
        assert [b"250 2.1.0 Sender OK"] == client.command(b"MAIL FROM:<a@b.example>")

    def test_pipelined_after_data(
        self, client: FakeClient, memory: MemoryHandler
    ) -> None:
        """Commands pipelined after the end marker are answered after the 250."""
        client.send(
            b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
            b"DATA\r\nhello\r\n.\r\n"
            b"MAIL FROM:<e@f.example>\r\nRCPT TO:<g@h.example>\r\n"
            b"DATA\r\nsecond\r\n.\r\nQUIT\r\n"
        )
        codes = [line[:4] for line in client.replies() if line[3:4] == b" "]
        assert [
            b"250 ",  # EHLO
            b"250 ",
            b"250 ",
            b"354 ",
            b"250 ",
            b"250 ",
            b"250 ",
            b"354 ",
            b"250 ",
            b"221 ",
        ] == codes
        assert [b"hello\r\n", b"second\r\n"] == [e.content for e in memory.messages]
        assert client.closed

    def test_data_with_argument(self, client: FakeClient) -> None:
        """DATA takes no argument."""
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        client.command(b"RCPT TO:<c@d.example>")
        assert [b"501 5.5.4 Syntax: DATA takes no arguments"] == client.command(
            b"DATA now"
        )


class Hooks:
    """A full handler whose hooks answer through Deferreds the test controls."""

    def __init__(self) -> None:
        self.pending: list[Deferred] = []
        self.messages: list = []

    def check_sender(self, envelope):
        d: Deferred = Deferred()
        self.pending.append(d)
        return d

    def check_recipient(self, envelope, address, options):
        if address.startswith("nobody@"):
            raise SMTPError(550, "5.1.1", "No such user here")
        if address.startswith("crash@"):
            raise RuntimeError("boom")
        return succeed(None)

    def handle_message(self, envelope):
        self.messages.append(envelope)
        return "QID1"


class TestHandlers:
    def _client(self, handler, clock) -> FakeClient:
        client = connect(SMTPFactory(handler, hostname="mx.test", reactor=clock))
        client.replies()
        return client

    def test_replies_wait_for_pending_hook(self, clock: Clock) -> None:
        """Pipelined commands are held while a hook's Deferred is pending."""
        hooks = Hooks()
        client = self._client(hooks, clock)
        client.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nNOOP\r\n")
        assert b"250 HELP" == client.replies()[-1]
        hooks.pending[0].callback(None)
        assert [b"250 2.1.0 Sender OK", b"250 2.0.0 OK"] == client.replies()

    def test_smtp_error_and_unexpected_error(self, clock: Clock) -> None:
        """SMTPError gives its reply; any other exception gives 451 4.3.0."""
        hooks = Hooks()
        client = self._client(hooks, clock)
        client.command(b"EHLO c.example")
        client.send(b"MAIL FROM:<a@b.example>\r\n")
        hooks.pending[0].callback(None)
        client.replies()
        assert [b"550 5.1.1 No such user here"] == client.command(
            b"RCPT TO:<nobody@b.example>"
        )
        assert [b"451 4.3.0 Requested action aborted: local error"] == client.command(
            b"RCPT TO:<crash@b.example>"
        )
        assert [b"250 2.1.5 Recipient OK"] == client.command(b"RCPT TO:<ok@b.example>")
        client.command(b"DATA")
        assert [b"250 2.0.0 OK: queued as QID1"] == client.command(b"x\r\n.")

    def test_coroutine_handler(self, clock: Clock) -> None:
        """A coroutine handler's SMTPError becomes the reply to DATA."""

        async def handle(envelope):
            if b"spam" in envelope.content:
                raise SMTPError(550, "5.7.1", "Spam is not welcome here")

        client = self._client(handle, clock)
        assert [b"550 5.7.1 Spam is not welcome here"] == transaction(
            client, b"spam\r\n"
        )
        assert transaction(client, b"ham\r\n")[0].startswith(b"250 2.0.0 OK: queued")

    def test_handler_failure_nothing_accepted(self, clock: Clock) -> None:
        """A failing handler gets 451, and the session takes the next message."""
        calls = []

        def handle(envelope):
            calls.append(envelope)
            if len(calls) == 1:
                raise OSError("disk full")

        client = self._client(handle, clock)
        assert [b"451 4.3.0 Requested action aborted: local error"] == transaction(
            client
        )
        assert transaction(client)[0].startswith(b"250 2.0.0 OK: queued as ")

    def test_handler_must_be_usable(self, clock: Clock) -> None:
        """A handler that is neither callable nor has hooks is refused at once."""
        with pytest.raises(TypeError):
            SMTPFactory(object(), hostname="mx.test", reactor=clock)

    def test_streaming_receiver_back_pressure(self, clock: Clock) -> None:
        """A streaming receiver gets chunks and may pause the connection."""

        class Receiver:
            def __init__(self):
                self.data = []
                self.producer = None
                self.finished = Deferred()

            def registerProducer(self, producer, streaming):
                self.producer = producer

            def unregisterProducer(self):
                self.producer = None

            def write(self, data):
                self.data.append(data)
                self.producer.pauseProducing()

            def finish(self):
                return self.finished

            def abort(self):
                raise AssertionError("not aborted")

        receiver = Receiver()

        class Streaming:
            def open_message(self, envelope):
                return receiver

        client = self._client(Streaming(), clock)
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        client.command(b"RCPT TO:<c@d.example>")
        client.command(b"DATA")
        client.send(b"x" * 1000 + b"\r\n")
        assert "paused" == client.transport.producerState
        client.send(b".\r\nNOOP\r\n")
        assert [] == client.replies()
        receiver.finished.callback("Q9")
        assert [b"250 2.0.0 OK: queued as Q9", b"250 2.0.0 OK"] == client.replies()
        assert b"x" * 1000 + b"\r\n" == b"".join(receiver.data)


class TestTimeout:
    def test_idle_timeout(self, factory: SMTPFactory, clock: Clock) -> None:
        """An idle session gets 421 4.4.2 and is closed."""
        client = connect(factory)
        client.replies()
        clock.advance(299)
        client.command(b"EHLO c.example")
        clock.advance(299)
        assert not client.closed
        clock.advance(2)
        assert [b"421 4.4.2 mx.test Timeout, closing connection"] == client.replies()
        assert client.closed

    @pytest.mark.parametrize(
        "gaps", [[299.0], [1.0, 299.0, 0.5], [0.1, 0.2, 0.3, 123.456], [299.999]]
    )
    def test_timeout_exactly_after_the_last_input(
        self, factory: SMTPFactory, clock: Clock, gaps: list[float]
    ) -> None:
        """However many reads came, and when, the 421 comes exactly
        C{timeout} seconds after the last one: not a moment before or after."""
        client = connect(factory)
        client.replies()
        client.command(b"EHLO c.example")
        for gap in gaps:
            clock.advance(gap)
            assert [b"250 2.0.0 OK"] == client.command(b"NOOP")
        last = clock.seconds()
        deadline = last + 300
        while (
            clock.getDelayedCalls()
            and min(call.getTime() for call in clock.getDelayedCalls()) < deadline
        ):
            clock.advance(
                min(call.getTime() for call in clock.getDelayedCalls())
                - clock.seconds()
            )
            assert not client.closed, clock.seconds()
        clock.advance(deadline - clock.seconds())
        assert deadline == clock.seconds()
        assert [b"421 4.4.2 mx.test Timeout, closing connection"] == client.replies()
        assert client.closed

    def test_timeout_rearmed_after_a_wait_counts_from_then(
        self, factory: SMTPFactory, clock: Clock
    ) -> None:
        """Input while the timer runs, then setTimeout (a hook's wait ends):
        the timeout counts from setTimeout, and later input moves it again."""
        client = connect(factory)
        client.replies()
        client.command(b"EHLO c.example")
        proto = client.protocol
        clock.advance(100)
        client.command(b"NOOP")
        clock.advance(50)
        proto.setTimeout(10)  # shorter than what is left: due earlier
        clock.advance(9.5)
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")
        clock.advance(9.75)
        assert not client.closed
        clock.advance(0.25)
        assert [b"421 4.4.2 mx.test Timeout, closing connection"] == client.replies()
        assert client.closed

    def test_no_timeout_after_set_timeout_none(
        self, factory: SMTPFactory, clock: Clock
    ) -> None:
        """setTimeout(None) cancels; input then does not bring it back."""
        client = connect(factory)
        client.replies()
        client.command(b"EHLO c.example")
        proto = client.protocol
        clock.advance(10)
        client.command(b"NOOP")
        assert 300 == proto.setTimeout(None)
        client.command(b"NOOP")
        clock.advance(1000)
        assert not client.closed

    def test_reads_do_not_add_timers(self, factory: SMTPFactory, clock: Clock) -> None:
        """The idle timer stays one call however many reads reset it."""
        client = connect(factory)
        client.replies()
        client.command(b"EHLO c.example")
        before = len(clock.getDelayedCalls())
        for _ in range(50):
            clock.advance(7)
            client.command(b"NOOP")
        assert before == len(clock.getDelayedCalls())
        clock.advance(299)
        assert not client.closed
        clock.advance(1)
        assert client.closed

    def test_bytes_reset_timer_during_data(
        self, factory: SMTPFactory, clock: Clock
    ) -> None:
        """Any received bytes, even mid-DATA, reset the idle timer."""
        client = connect(factory)
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        client.command(b"RCPT TO:<c@d.example>")
        client.command(b"DATA")
        for _ in range(5):
            clock.advance(200)
            client.send(b"more\r\n")
        assert not client.closed


class TestConnectionLimits:
    def test_max_connections(self, memory: MemoryHandler, clock: Clock) -> None:
        """Beyond max_connections a new client gets 421 4.7.0 and is closed."""
        factory = SMTPFactory(
            memory, hostname="mx.test", reactor=clock, limits=Limits(max_connections=1)
        )
        first = connect(factory)
        second = connect(factory)
        assert [
            b"421 mx.test Too many connections, try again later"
        ] == second.replies()
        assert second.closed and not first.closed
        first.protocol.connectionLost(None)
        third = connect(factory)
        assert third.replies()[0].startswith(b"220 ")


class TestSlowClients:
    def test_dripped_command_line(self, factory: SMTPFactory, clock: Clock) -> None:
        """A command line dripped byte by byte is cut off after line_timeout."""
        client = connect(factory)
        client.replies()
        for byte in b"EHLO slow.example":
            clock.advance(20)
            client.send(bytes([byte]))
        assert client.closed
        assert [b"421 mx.test Timeout, closing connection"] == client.replies()

    def test_complete_lines_do_not_start_the_clock(
        self, factory: SMTPFactory, clock: Clock
    ) -> None:
        """Only a partial line is on the line clock; whole lines leave it off."""
        client = connect(factory)
        client.replies()
        for _ in range(20):
            clock.advance(100)
            client.command(b"NOOP")
        assert not client.closed
        # Only the idle timer and the session's lifetime bound are armed.
        lifetime = factory.session_deadlines.timer
        assert [] == [c for c in clock.getDelayedCalls()[1:] if c is not lifetime]

    def test_dripped_data(self, factory: SMTPFactory, clock: Clock) -> None:
        """A message dripped slowly is cut off after data_timeout."""
        client = connect(factory)
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        client.command(b"RCPT TO:<c@d.example>")
        client.command(b"DATA")
        for _ in range(int(1800 / 200) + 1):
            clock.advance(200)
            client.send(b"x\r\n")
        assert client.closed
        assert [b"421 4.4.2 mx.test Timeout, closing connection"] == client.replies()

    def test_data_deadline_is_exact(self, clock: Clock) -> None:
        """The body must end data_timeout after DATA: a read at exactly that
        time still counts, the next one after it is cut off."""
        factory = SMTPFactory(
            MemoryHandler(),
            hostname="mx.test",
            reactor=clock,
            limits=Limits(data_timeout=10.0),
        )
        client = connect(factory)
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        client.command(b"RCPT TO:<c@d.example>")
        clock.advance(3.25)  # DATA not at a round time
        client.command(b"DATA")
        clock.advance(10.0)
        client.send(b"x\r\n")
        assert not client.closed
        clock.advance(0.25)
        client.send(b"y\r\n")
        assert client.closed
        assert [b"421 4.4.2 mx.test Timeout, closing connection"] == client.replies()


class TestLogging:
    def _events(self, factory, body=b"x\r\n"):
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        try:
            client = connect(factory)
            transaction(client, body)
            client.command(b"QUIT")
            client.protocol.connectionLost(None)
        finally:
            globalLogPublisher.removeObserver(events.append)
        return [e for e in events if e.get("log_namespace") == "twisted_smtpd.protocol"]

    def test_message_event(self, factory: SMTPFactory) -> None:
        """Each message leaves one structured event; its session needs no other."""
        events = self._events(factory)
        message = [e for e in events if "outcome" in e]
        assert 1 == len(message)
        assert "a@example.org" == message[0]["mail_from"]
        assert "192.0.2.1:40000" == message[0]["peer"]
        assert 1 == message[0]["rcpt_count"]
        assert 3 == message[0]["size"]
        assert "accepted" == message[0]["outcome"]
        assert message[0]["session_id"].startswith(factory._id_prefix)
        assert [] == [e for e in events if "messages" in e]

    def test_session_without_mail_is_logged(self, factory: SMTPFactory) -> None:
        """A session that sent no message leaves one event with its peer."""
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        try:
            client = connect(factory)
            client.command(b"QUIT")
            client.protocol.connectionLost(None)
        finally:
            globalLogPublisher.removeObserver(events.append)
        closed = [e for e in events if "messages" in e]
        assert 1 == len(closed) and 0 == closed[0]["messages"]
        assert "192.0.2.1:40000" == closed[0]["peer"]

    def test_quiet_logs_only_refusals(self, clock: Clock) -> None:
        """quiet=True drops the routine lines but keeps refused messages."""

        def refuse_spam(envelope):
            if b"spam" in envelope.content:
                raise SMTPError(550, "5.7.1", "no")

        factory = SMTPFactory(
            refuse_spam, hostname="mx.test", reactor=clock, quiet=True
        )
        assert [] == self._events(factory)
        refused = self._events(factory, b"spam\r\n")
        assert ["refused"] == [e["outcome"] for e in refused]


class TestSlowHandlers:
    def test_no_timeout_while_the_handler_works(self, clock: Clock) -> None:
        """A slow handler is not cut off by the idle timer (no 421, no resend)."""
        pending: Deferred = Deferred()
        factory = SMTPFactory(
            lambda e: pending,
            hostname="mx.test",
            reactor=clock,
            limits=Limits(handler_timeout=2000),  # its own deadline is later
        )
        client = connect(factory)
        client.replies()
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        client.command(b"RCPT TO:<c@d.example>")
        client.command(b"DATA")
        client.send(b"x\r\n.\r\n")
        clock.advance(1000)
        assert not client.closed and [] == client.replies()
        pending.callback("Q7")
        assert [b"250 2.0.0 OK: queued as Q7"] == client.replies()
        clock.advance(299)
        assert not client.closed
        clock.advance(2)
        assert client.closed


class TestChunking:
    """BDAT (RFC 3030): binary chunks, no dot-stuffing, no end marker."""

    def _ready(self, client: FakeClient) -> None:
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        client.command(b"RCPT TO:<c@d.example>")

    def test_chunks_make_one_message(
        self, client: FakeClient, memory: MemoryHandler
    ) -> None:
        """Chunks are joined byte for byte; dots and CRLF.CRLF are plain data."""
        self._ready(client)
        first = b"Subject: x\r\n\r\n.\r\n"
        client.send(b"BDAT 17\r\n" + first)
        assert [b"250 2.0.0 17 octets received"] == client.replies()
        client.send(b"BDAT 5 LAST\r\n..x\r\n")
        replies = client.replies()
        assert 1 == len(replies) and replies[0].startswith(b"250 2.0.0 OK: queued as ")
        assert first + b"..x\r\n" == memory.messages[0].content
        assert 22 == memory.messages[0].size

    def test_pipelined_chunks_split_anywhere(
        self, client: FakeClient, memory: MemoryHandler
    ) -> None:
        """A pipelined BDAT session split at every byte gives the same result."""
        self._ready(client)
        stream = b"BDAT 5\r\nhelloBDAT 3 LAST\r\n\r\n.NOOP\r\n"
        for byte in stream:
            client.send(bytes([byte]))
        replies = client.replies()
        assert b"250 2.0.0 5 octets received" == replies[0]
        assert replies[1].startswith(b"250 2.0.0 OK: queued as ")
        assert b"250 2.0.0 OK" == replies[2]
        assert b"hello\r\n." == memory.messages[0].content

    def test_refused_chunk_is_discarded(
        self, client: FakeClient, memory: MemoryHandler
    ) -> None:
        """BDAT without recipients gets 503, and its bytes are not read as commands."""
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        client.send(b"BDAT 10 LAST\r\nQUIT\r\nxxxx")
        assert [b"503 5.5.1 Need RCPT before BDAT"] == client.replies()
        assert not client.closed
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")

    def test_data_not_allowed_after_bdat(self, client: FakeClient) -> None:
        """DATA in the middle of a BDAT message is a sequence error."""
        self._ready(client)
        client.send(b"BDAT 1\r\nx")
        assert [b"250 2.0.0 1 octets received"] == client.replies()
        assert [b"503 5.5.1 DATA not allowed during BDAT"] == client.command(b"DATA")

    def test_too_big(self, memory: MemoryHandler, clock: Clock) -> None:
        """Past the size limit: the chunk is read, 552, nothing is delivered."""
        factory = SMTPFactory(
            memory, hostname="mx.test", reactor=clock, limits=Limits(max_message_size=8)
        )
        client = connect(factory)
        client.replies()
        self._ready(client)
        client.send(b"BDAT 6\r\n123456")
        assert [b"250 2.0.0 6 octets received"] == client.replies()
        client.send(b"BDAT 6 LAST\r\n123456")
        assert [
            b"552 5.3.4 Message size exceeds fixed maximum message size"
        ] == client.replies()
        assert [] == memory.messages
        assert [b"250 2.1.0 Sender OK"] == client.command(b"MAIL FROM:<a@b.example>")

    def test_rset_drops_the_message(
        self, client: FakeClient, memory: MemoryHandler
    ) -> None:
        """RSET between chunks aborts the message."""
        self._ready(client)
        client.send(b"BDAT 3\r\nabc")
        assert [b"250 2.0.0 3 octets received"] == client.replies()
        assert [b"250 2.0.0 Reset OK"] == client.command(b"RSET")
        assert [b"250 2.1.0 Sender OK"] == client.command(b"MAIL FROM:<e@f.example>")
        assert [] == memory.messages

    @pytest.mark.parametrize("argument", [b"", b"x", b"-1", b"5 FIRST", b"1 LAST x"])
    def test_syntax(self, client: FakeClient, argument: bytes) -> None:
        """A malformed BDAT is 501 5.5.4 and nothing is read as a chunk."""
        self._ready(client)
        assert [b"501 5.5.4 Syntax: BDAT chunk-size [LAST]"] == client.command(
            b"BDAT " + argument
        )
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")

    def test_empty_last_chunk(self, client: FakeClient, memory: MemoryHandler) -> None:
        """BDAT 0 LAST ends a message (here an empty one)."""
        self._ready(client)
        assert client.command(b"BDAT 0 LAST")[0].startswith(b"250 2.0.0 OK: queued")
        assert b"" == memory.messages[0].content


class TestCheckClient:
    def test_refused_at_connect(self, clock: Clock) -> None:
        """check_client can refuse a peer: its reply replaces the greeting."""

        class Blocklist:
            def check_client(self, peer):
                if peer.host == "192.0.2.66":
                    raise SMTPError(554, "5.7.1", "Your address is blocked")

            def handle_message(self, envelope):
                pass

        from twisted.internet.address import IPv4Address

        factory = SMTPFactory(Blocklist(), hostname="mx.test", reactor=clock)
        bad = connect(factory, IPv4Address("TCP", "192.0.2.66", 1000))
        bad.send(b"EHLO early.talker\r\n")
        assert [b"554 Your address is blocked"] == bad.replies()
        clock.advance(0)
        assert bad.closed
        good = connect(factory, IPv4Address("TCP", "192.0.2.67", 1000))
        assert [b"220 mx.test ESMTP twisted_smtpd ready"] == good.replies()

    def test_greeting_waits_for_the_verdict(self, clock: Clock) -> None:
        """A slow check_client holds the greeting and any early commands."""
        verdict: Deferred = Deferred()

        class Slow:
            def check_client(self, peer):
                return verdict

            def handle_message(self, envelope):
                pass

        client = connect(SMTPFactory(Slow(), hostname="mx.test", reactor=clock))
        client.send(b"NOOP\r\n")
        assert [] == client.replies()
        verdict.callback(None)
        assert [b"220 mx.test ESMTP twisted_smtpd ready", b"250 OK"] == (
            client.replies()
        )


class TestReceivedHeader:
    """The Received: trace field (RFC 5321 4.4) the server makes per message."""

    def _envelope(self, **changes):
        from twisted.internet.address import IPv4Address

        from twisted_smtpd import Envelope

        envelope = Envelope(
            session_id="S",
            peer=IPv4Address("TCP", "192.0.2.1", 4000),
            helo="client.example",
            esmtp=True,
            tls=None,
            auth=None,
            rcpt_tos=["c@d.example"],
            message_id="S-1",
        )
        for name, value in changes.items():
            setattr(envelope, name, value)
        return envelope

    def _header(self, envelope) -> bytes:
        from twisted_smtpd.protocol import received_header

        return received_header(envelope, "mx.test", "twisted_smtpd", 0.0)

    def test_single_recipient(self) -> None:
        """One recipient is named in a for clause; the date ends the field."""
        lines = self._header(self._envelope()).split(b"\r\n")
        assert b"Received: from client.example ([192.0.2.1])" == lines[0]
        assert b"\tby mx.test (twisted_smtpd) with ESMTP id S-1" == lines[1]
        assert lines[2].startswith(b"\tfor <c@d.example>; ")
        assert b"1970" in lines[2] and b"" == lines[3]

    def test_several_recipients_not_disclosed(self) -> None:
        """With several recipients no for clause lists them."""
        header = self._header(self._envelope(rcpt_tos=["a@x.example", "b@x.example"]))
        assert b"for <" not in header
        assert b"with ESMTP id S-1; " in header

    def test_ipv6_and_tls(self) -> None:
        """IPv6 peers are address literals; TLS adds a comment and ESMTPS."""
        from twisted.internet.address import IPv6Address

        from twisted_smtpd import TLSInfo

        header = self._header(
            self._envelope(
                peer=IPv6Address("TCP", "2001:db8::1", 4000),
                tls=TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
            )
        )
        assert header.startswith(b"Received: from client.example ([IPv6:2001:db8::1])")
        assert b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n" in header
        assert b"with ESMTPS id" in header

    def test_utf8_names(self) -> None:
        """SMTPUTF8 transactions say UTF8SMTP and keep UTF-8 addresses."""
        header = self._header(
            self._envelope(
                mail_options={"SMTPUTF8": None}, rcpt_tos=["jos\u00e9@b.example"]
            )
        )
        assert b"with UTF8SMTP id" in header
        assert "for <jos\u00e9@b.example>".encode() in header


class CountingTransport(TLSStringTransport):
    """Counts the writes, to check how many syscalls replies would cost."""

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class Keeper:
    """A streaming receiver that keeps its producer and finishes when told."""

    def __init__(self) -> None:
        self.producer = None
        self.finished: list[Deferred] = []
        self.data: list[bytes] = []

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        pass  # deliberately keeps the reference

    def write(self, data):
        self.data.append(data)

    def finish(self):
        d: Deferred = Deferred()
        self.finished.append(d)
        return d

    def abort(self):
        pass


class TestIssue10Regressions:
    """Defects of the protocol before the redesign (issue 10), fixed by it."""

    def _streaming(self, clock: Clock, receiver: Keeper) -> FakeClient:
        class Streaming:
            def open_message(self, envelope):
                return receiver

        # Room for the 50,000 pipelined NOOPs some tests hold behind a hook.
        limits = Limits(max_junk_commands=100_000)
        factory = SMTPFactory(
            Streaming(), hostname="mx.test", reactor=clock, limits=limits
        )
        client = connect(factory)
        client.replies()
        client.command(b"EHLO c.example")
        client.command(b"MAIL FROM:<a@b.example>")
        client.command(b"RCPT TO:<c@d.example>")
        client.command(b"DATA")
        return client

    def test_receiver_resume_does_not_unpause_held_input(self, clock: Clock) -> None:
        """A receiver's resume can't undo the pause for input held past the bound.

        Defect 1: the transport's pause had two owners; a receiver that resumed
        while pipelined input was held left the socket read without limit.
        """
        receiver = Keeper()
        client = self._streaming(clock, receiver)
        client.send(b"body\r\n.\r\n")
        assert 1 == len(receiver.finished)
        client.send(b"NOOP\r\n" * 50_000)  # 300 KB held behind finish()
        assert "paused" == client.transport.producerState
        receiver.producer.pauseProducing()
        receiver.producer.resumeProducing()  # e.g. a spool write completed
        assert "paused" == client.transport.producerState
        receiver.finished[0].callback("Q1")
        assert "producing" == client.transport.producerState
        replies = client.replies()
        assert b"250 2.0.0 OK: queued as Q1" == replies[0]
        assert 50_001 == len(replies)

    def test_producer_is_revoked_after_the_message(self, clock: Clock) -> None:
        """A receiver that keeps its producer can't pause the next message."""
        receiver = Keeper()
        client = self._streaming(clock, receiver)
        client.send(b"body\r\n.\r\n")
        receiver.finished[0].callback("Q1")
        assert [b"250 2.0.0 OK: queued as Q1"] == client.replies()
        receiver.producer.pauseProducing()
        assert "producing" == client.transport.producerState
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")

    def test_receiver_pause_is_released_when_the_message_ends(
        self, clock: Clock
    ) -> None:
        """A receiver that paused and never resumed does not stall the session."""
        receiver = Keeper()
        client = self._streaming(clock, receiver)
        client.send(b"body\r\n")
        receiver.producer.pauseProducing()
        assert "paused" == client.transport.producerState
        client.send(b".\r\n")
        receiver.finished[0].callback("Q1")
        assert "producing" == client.transport.producerState
        assert [b"250 2.0.0 OK: queued as Q1"] == client.replies()

    def test_auth_failure_delay_ends_with_the_connection(self, clock: Clock) -> None:
        """Defect 2: no 535 is written after the connection is gone."""
        from base64 import b64encode

        from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse

        from twisted_smtpd.auth import AuthPolicy

        users = InMemoryUsernamePasswordDatabaseDontUse()
        users.addUser(b"alice", b"secret")
        auth = AuthPolicy.from_checkers([users], allow_without_tls=True)
        factory = SMTPFactory(
            lambda e: None, hostname="mx.test", reactor=clock, auth=auth
        )
        client = connect(factory)
        client.command(b"EHLO c.example")
        assert [] == client.command(b"AUTH PLAIN " + b64encode(b"\0alice\0wrong"))
        client.protocol.connectionLost(None)
        before = client.transport.value()
        clock.advance(10)
        assert before == client.transport.value()
        assert [] == clock.getDelayedCalls()

    def test_slow_hook_answers_in_one_write(self, clock: Clock) -> None:
        """Defect 4: a hook's reply and the held replies behind it leave together."""
        hooks = Hooks()
        transport = CountingTransport()
        client = connect(
            SMTPFactory(hooks, hostname="mx.test", reactor=clock), transport=transport
        )
        client.command(b"EHLO c.example")
        client.send(b"MAIL FROM:<a@b.example>\r\nNOOP\r\nNOOP\r\n")
        assert [] == client.replies()
        before = transport.writes
        hooks.pending[0].callback(None)
        assert 1 == transport.writes - before
        assert [
            b"250 2.1.0 Sender OK",
            b"250 2.0.0 OK",
            b"250 2.0.0 OK",
        ] == client.replies()


# -- a handler without hooks takes a shorter path: the same replies ----------
_SCRIPT_LINES = [
    b"EHLO client.example",
    b"HELO client.example",
    b"MAIL FROM:<a@example.org>",
    b"MAIL FROM:<> SIZE=10",
    b"mail from:<a@example.org> SIZE=999999999",
    b"MAIL FROM:<a@example.org> BODY=8BITMIME SMTPUTF8",
    b"MAIL FROM:<a@example.org> XFOO=1",
    b"MAIL FROM:<a@example.org> SIZE=x",
    b'MAIL FROM:<"quoted local"@example.org>',
    b"MAIL FROM:<@route.example:a@example.org>",
    b"MAIL FROM: <a@example.org>",
    b"MAIL FROM:a@example.org",
    b"MAIL FROM:<\xc3\xa9@example.org>",
    b"MAIL FROM:<a@example.org",
    b"MAIL TO:<a@example.org>",
    b"RCPT TO:<b@example.net>",
    b"RCPT TO:<c@example.net> NOTIFY=NEVER",
    b"RCPT TO:<postmaster>",
    b"RCPT TO:<\xc3\xa9@example.net>",
    b"RCPT TO:<>",
    b"RCPT TO:<b@example.net> XFOO=1",
    b"RCPT TO:<" + b"l" * 65 + b"@example.net>",
    b"RCPT TO:<b@" + b"d" * 300 + b">",
    b"DATA",
    b"DATA x",
    b"RSET",
    b"NOOP",
    b"VRFY b",
    b"MAIL FROM:<" + b"a" * 1100 + b"@example.org>",
]
_BODY = b"Subject: t\r\n\r\n..dot\r\nline\r\n.\r\n"


def _hook_handlers() -> list[tuple[str, Any, list[Any]]]:
    """Three handlers that accept everything: no hooks, synchronous hooks,
    hooks returning fired Deferreds.  Each comes with its stored envelopes."""
    plain: list[Any] = []

    def accept(envelope: Any) -> None:
        plain.append(envelope)

    accept.supports_dsn = True  # type: ignore[attr-defined]

    class Sync:
        supports_dsn = True

        def __init__(self) -> None:
            self.stored: list[Any] = []

        def check_sender(self, envelope: Any) -> None:
            return None

        def check_recipient(self, envelope: Any, address: str, params: Any) -> None:
            return None

        def handle_message(self, envelope: Any) -> None:
            self.stored.append(envelope)

    class Deferring(Sync):
        def check_sender(self, envelope: Any) -> Any:  # type: ignore[override]
            return succeed(None)

        def check_recipient(  # type: ignore[override]
            self, envelope: Any, address: str, params: Any
        ) -> Any:
            return succeed(None)

    sync, deferring = Sync(), Deferring()
    return [
        ("none", accept, plain),
        ("sync", sync, sync.stored),
        ("deferred", deferring, deferring.stored),
    ]


def _run_script(reads: list[bytes]) -> list[tuple[list[bytes], list[Any]]]:
    """Each handler's replies and stored (sender, recipients, content)."""
    results = []
    for _, handler, stored in _hook_handlers():
        factory = SMTPFactory(
            handler,
            hostname="mx.test",
            reactor=Clock(),
            limits=Limits(
                max_recipients=2, max_message_size=1000, max_bad_commands=1000
            ),
        )
        client = connect(factory)
        for data in reads:
            client.send(data)
        # Session ids (and so queue ids) are random per factory.
        output = client.transport.value().replace(
            client.protocol.session.session_id.encode(), b"SESSION"
        )
        replies = [line for line in output.split(b"\r\n") if line]
        results.append(
            (
                replies,
                [
                    (e.mail_from, e.rcpt_tos, e.rcpt_options, e.content, e.mail_options)
                    for e in stored
                ],
            )
        )
    return results


class TestHooklessPathAgrees:
    """MAIL and RCPT answer a handler without hooks directly; every reply and
    stored message must be what a handler with hooks that accept gets."""

    @pytest.mark.parametrize("line", _SCRIPT_LINES)
    def test_edge_table(self, line: bytes) -> None:
        """Each line in a transaction, one command per read, then pipelined."""
        lines = [b"EHLO client.example", line, b"RCPT TO:<b@example.net>"]
        lines += [b"RCPT TO:<c@example.net>", b"RCPT TO:<d@example.net>", b"DATA"]
        lines += [_BODY[:-2], b"RSET", b"MAIL FROM:<a@example.org>", line]
        lines += [b"RCPT TO:<c@example.net>", b"DATA", _BODY[:-2], b"RSET"]
        lines += [b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@x.y>"]
        lines += [b"DATA", _BODY[:-2]]
        reads = [line + b"\r\n" for line in lines]
        first, *others = _run_script(reads)
        assert first[1], "no message was stored: the script proves nothing"
        for other in others:
            assert first == other
        assert [first] * 3 == _run_script([b"".join(reads)])

    @given(
        st.lists(
            st.one_of(
                st.sampled_from(_SCRIPT_LINES),
                st.just(_BODY[:-2]),
                st.binary(max_size=40).filter(lambda b: b"\r\n" not in b),
            ),
            max_size=25,
        ),
        st.booleans(),
    )
    @settings(max_examples=60, deadline=None)
    def test_any_script(self, lines: list[bytes], pipelined: bool) -> None:
        reads = [line + b"\r\n" for line in [b"EHLO client.example", *lines]]
        if pipelined:
            reads = [b"".join(reads)]
        first, *others = _run_script(reads)
        for other in others:
            assert first == other


# -- without an events observer, finish() is called without the hook runner ---
def _finish_results() -> list[tuple[str, Any]]:
    """Handler results of every kind: (name, a function giving one)."""

    async def coroutine_none() -> None:
        return None

    async def coroutine_raises() -> None:
        raise SMTPError(554, "5.7.1", "refused later")

    def raise_smtp() -> None:
        raise SMTPError(550, "5.7.1", "no thanks")

    def raise_other() -> None:
        raise RuntimeError("handler bug")

    return [
        ("none", lambda: None),
        ("queue id", lambda: "QID7"),
        ("unsafe queue id", lambda: "Q\r\nX"),
        ("empty string", lambda: ""),
        ("deferred", lambda: succeed("QD")),
        ("pending deferred", lambda: Deferred()),
        ("coroutine", coroutine_none),
        ("coroutine raises", coroutine_raises),
        ("smtp error", raise_smtp),
        ("other error", raise_other),
        ("mapping", lambda: {"b@example.net": None}),
        ("mapping refused", lambda: {"b@example.net": SMTPError(550, "5.1.1", "x")}),
    ]


class TestSynchronousFinishAgrees:
    """With no events observer the end of data calls finish() itself; with
    one it goes through the hook runner.  The replies must not differ."""

    @pytest.mark.parametrize("name, result", _finish_results())
    def test_same_replies(self, name: str, result: Any) -> None:
        from twisted_smtpd._events import SessionEvents

        outputs = []
        for events in (None, SessionEvents()):

            class Receiver:
                def write(self, data: bytes) -> None:
                    pass

                def finish(self) -> Any:
                    return result()

                def abort(self) -> None:
                    pass

            class Handler:
                def open_message(self, envelope: Any) -> Any:
                    return Receiver()

            clock = Clock()
            factory = SMTPFactory(
                Handler(), hostname="mx.test", reactor=clock, events=events
            )
            client = connect(factory)
            replies = transaction(client)
            clock.advance(factory.limits.handler_timeout + 1)
            replies += client.command(b"NOOP")
            replies += client.command(b"MAIL FROM:<a@example.org>")
            outputs.append(
                [
                    r.replace(client.protocol.session.session_id.encode(), b"S")
                    for r in replies
                ]
            )
        assert outputs[0] == outputs[1]
        assert [b"250 2.0.0 OK", b"250 2.1.0 Sender OK"] == outputs[0][-2:]


class TestQueuedReply:
    """The 250 after a stored message is made as bytes, not as a Reply."""

    @pytest.mark.parametrize(
        "greeting", [b"HELO client.example", b"EHLO client.example"]
    )
    def test_wire_form_per_greeting(self, greeting: bytes) -> None:
        """Enhanced code after EHLO only, the message's id, one line."""
        factory = SMTPFactory(MemoryHandler(), hostname="mx.test", reactor=Clock())
        client = connect(factory)
        client.replies()
        client.command(greeting)
        client.command(b"MAIL FROM:<a@example.org>")
        client.command(b"RCPT TO:<b@example.net>")
        client.command(b"DATA")
        client.send(b"Subject: t\r\n\r\nhi\r\n.\r\n")
        queue_id = f"{client.protocol.session.session_id}-1".encode()
        code = b"250 2.0.0 " if greeting.startswith(b"EHLO") else b"250 "
        assert [code + b"OK: queued as " + queue_id] == client.replies()

    def test_subclass_reply_sees_it(self) -> None:
        """A subclass that overrides reply() still gets the 250 as a Reply."""
        from twisted_smtpd import Reply
        from twisted_smtpd.protocol import SMTPServerProtocol

        seen: list[Reply] = []

        class Watching(SMTPServerProtocol):
            def reply(self, reply: Reply) -> None:
                seen.append(reply)
                super().reply(reply)

        factory = SMTPFactory(MemoryHandler(), hostname="mx.test", reactor=Clock())
        factory.protocol = Watching
        client = connect(factory)
        replies = transaction(client)
        assert [b"250 2.0.0 OK: queued as " + seen[-1].text.split()[-1].encode()] == (
            replies
        )
        assert (250, "2.0.0") == (seen[-1].code, seen[-1].enhanced)
        assert seen[-1].text.startswith("OK: queued as ")
