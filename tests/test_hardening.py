"""Issue 12: handler faults and handler output, DSN, and honest session details.

Each test drives the real protocol through L{twisted_smtpd.testing.connect}.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import UNIXAddress
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from twisted_smtpd import SMTPError, SMTPFactory
from twisted_smtpd.handlers import MaildirHandler, MemoryHandler
from twisted_smtpd.testing import FakeClient, connect


@pytest.fixture
def logged() -> Any:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def lines(events: list[dict[str, Any]], text: str) -> list[str]:
    return [line for line in map(formatEvent, events) if text in line]


def greeted(handler: Any, clock: Clock, peer: Any = None, **kwargs: Any) -> FakeClient:
    client = connect(
        SMTPFactory(handler, hostname="mx.test", reactor=clock, **kwargs), peer=peer
    )
    client.replies()
    client.command(b"EHLO client.example")
    return client


def transaction(client: FakeClient, body: bytes = b"Subject: x\r\n\r\nhi\r\n") -> list:
    """MAIL, RCPT, DATA and a message: every reply line from MAIL on."""
    replies = client.command(b"MAIL FROM:<a@example.org>")
    replies += client.command(b"RCPT TO:<b@example.net>")
    replies += client.command(b"DATA")
    client.send(body + b".\r\n")
    return replies + client.replies()


LOCAL_ERROR = b"451 4.3.0 Requested action aborted: local error"


# -- item 7: a receiver that breaks is a 451, and the session goes on ---------


class WriteRaises:
    def __init__(self) -> None:
        self.aborted = 0

    def open_message(self, envelope: Any) -> Any:
        return self

    def write(self, data: bytes) -> None:
        raise RuntimeError("the receiver broke")

    def finish(self) -> None:
        raise AssertionError("finish() after a failed write")

    def abort(self) -> None:
        self.aborted += 1


class OpensNothing:
    def open_message(self, envelope: Any) -> Any:
        return None


class TestBrokenReceivers:
    def test_write_raising_is_451_and_the_session_goes_on(
        self, clock: Clock, logged: list[dict[str, Any]]
    ) -> None:
        """Before: the connection was dropped."""
        handler = WriteRaises()
        client = greeted(handler, clock)
        replies = transaction(client)
        assert LOCAL_ERROR == replies[-1]
        assert not client.closed
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")
        assert 1 == handler.aborted
        failures = [e["log_failure"] for e in logged if "log_failure" in e]
        assert 1 == len(failures) and failures[0].check(RuntimeError)

    def test_write_raising_with_bdat(self, clock: Clock) -> None:
        client = greeted(WriteRaises(), clock)
        client.command(b"MAIL FROM:<a@example.org>")
        client.command(b"RCPT TO:<b@example.net>")
        client.send(b"BDAT 4\r\nabcdBDAT 3 LAST\r\nxyz")
        replies = client.replies()
        assert LOCAL_ERROR in replies
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")

    def test_a_second_message_is_taken(self, clock: Clock) -> None:
        """After the 451 the next transaction works (a new receiver)."""

        class Collect:
            def __init__(self, kept: list[bytes]) -> None:
                self.kept = kept

            def write(self, data: bytes) -> None:
                self.kept.append(data)

            def finish(self) -> None:
                return None

            def abort(self) -> None:
                pass

        class FailsOnce:
            def __init__(self) -> None:
                self.opened = 0
                self.kept: list[bytes] = []

            def open_message(self, envelope: Any) -> Any:
                self.opened += 1
                return WriteRaises() if self.opened == 1 else Collect(self.kept)

        handler = FailsOnce()
        client = greeted(handler, clock)
        assert LOCAL_ERROR == transaction(client)[-1]
        assert transaction(client, b"second\r\n")[-1].startswith(
            b"250 2.0.0 OK: queued as "
        )
        assert b"second\r\n" == b"".join(handler.kept)

    def test_open_message_returning_none_is_451(self, clock: Clock) -> None:
        """Before: an AttributeError on None dropped the connection."""
        client = greeted(OpensNothing(), clock)
        replies = transaction(client)
        assert LOCAL_ERROR in replies
        assert not client.closed
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")


# -- item 8: handler output is made safe for the wire -------------------------


class Refuses(MemoryHandler):
    def __init__(self, error: Any) -> None:
        super().__init__()
        self.error = error

    def check_recipient(self, envelope: Any, address: str, options: Any) -> None:
        raise self.error


class QueueId:
    def __init__(self, queue_id: Any) -> None:
        self.queue_id = queue_id

    def handle_message(self, envelope: Any) -> Any:
        return self.queue_id


class TestHandlerOutput:
    def test_bare_cr_cannot_smuggle_a_reply(
        self, clock: Clock, logged: list[dict[str, Any]]
    ) -> None:
        """Before: the client read two replies, a 550 and a 250."""
        handler = Refuses(SMTPError(550, "5.7.1", "refused\r250 2.0.0 fake"))
        client = greeted(handler, clock)
        client.command(b"MAIL FROM:<a@example.org>")
        client.send(b"RCPT TO:<b@example.net>\r\n")
        output = client.output()
        assert b"550 5.7.1 refused?250 2.0.0 fake\r\n" == output
        (line,) = lines(logged, "handler reply changed")
        assert "replaced" in line

    def test_a_megabyte_of_text(self, clock: Clock) -> None:
        client = greeted(Refuses(SMTPError(550, "5.7.1", "x" * 1_000_000)), clock)
        client.command(b"MAIL FROM:<a@example.org>")
        (reply,) = client.command(b"RCPT TO:<b@example.net>")
        assert reply.startswith(b"550 5.7.1 xxx") and len(reply) + 2 <= 512

    def test_a_success_code_cannot_pose_as_a_refusal(self, clock: Clock) -> None:
        """SMTPError(250): the recipient was not taken, so not a 250."""
        client = greeted(Refuses(SMTPError(250, "2.1.5", "fine")), clock)
        client.command(b"MAIL FROM:<a@example.org>")
        assert [LOCAL_ERROR] == client.command(b"RCPT TO:<b@example.net>")

    def test_bytes_queue_id(self, clock: Clock, logged: list[dict[str, Any]]) -> None:
        """Before: 250 2.0.0 OK: queued as b'abc'."""
        client = greeted(QueueId(b"abc123"), clock)
        assert b"250 2.0.0 OK: queued as abc123" == transaction(client)[-1]
        (line,) = lines(logged, "queue id changed")
        assert "bytes decoded" in line

    def test_queue_id_with_crlf(self, clock: Clock) -> None:
        client = greeted(QueueId("id\r\n250 2.0.0 fake"), clock)
        output = transaction(client)
        assert b"250 2.0.0 OK: queued as id??250?2.0.0?fake" == output[-1]
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")

    def test_long_queue_id(self, clock: Clock) -> None:
        reply = transaction(greeted(QueueId("q" * 100_000), clock))[-1]
        assert len(reply) + 2 <= 512


# -- item 12: DSN only where the delivery honours it ---------------------------


class HonoursDSN(MemoryHandler):
    supports_dsn = True


class TestDSN:
    def test_not_advertised_for_maildir(self, clock: Clock, tmp_path: Any) -> None:
        """Before: DSN advertised, NOTIFY accepted and then dropped."""
        handler = MaildirHandler(str(tmp_path / "M"), reactor=clock)
        client = connect(SMTPFactory(handler, hostname="mx.test", reactor=clock))
        client.replies()
        assert b"250-DSN" not in client.command(b"EHLO client.example")

    def test_parameters_refused_without_dsn(self, clock: Clock) -> None:
        client = greeted(MemoryHandler(), clock)
        assert [b"555 5.5.4 Parameter RET not recognized"] == client.command(
            b"MAIL FROM:<a@example.org> RET=HDRS"
        )
        client.command(b"MAIL FROM:<a@example.org>")
        assert [b"555 5.5.4 Parameter NOTIFY not recognized"] == client.command(
            b"RCPT TO:<b@example.net> NOTIFY=SUCCESS"
        )

    def test_advertised_and_passed_on_where_honoured(self, clock: Clock) -> None:
        handler = HonoursDSN()
        client = connect(SMTPFactory(handler, hostname="mx.test", reactor=clock))
        client.replies()
        assert b"250-DSN" in client.command(b"EHLO client.example")
        assert [b"250 2.1.0 Sender OK"] == client.command(
            b"MAIL FROM:<a@example.org> RET=HDRS ENVID=abc"
        )
        assert [b"250 2.1.5 Recipient OK"] == client.command(
            b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.net"
        )
        client.command(b"DATA")
        client.send(b"x\r\n.\r\n")
        (envelope,) = handler.messages
        assert "HDRS" == envelope.mail_options["RET"]
        assert "SUCCESS,FAILURE" == envelope.rcpt_options[0]["NOTIFY"]


# -- item 13: the Received header, HELP and the debug log ---------------------


class TestSessionDetails:
    def test_received_from_a_unix_socket(self, clock: Clock) -> None:
        """Before: Received: from client.example ([UNIXAddress(None)])."""
        handler = MemoryHandler()
        client = greeted(handler, clock, peer=UNIXAddress(None))
        transaction(client)
        (envelope,) = handler.messages
        first = envelope.received_header.split(b"\r\n")[0]
        assert b"Received: from client.example (localhost)" == first

    def test_help_lists_what_this_session_can_use(self, clock: Clock) -> None:
        """No STARTTLS or AUTH without TLS or AUTH configured; BDAT is there."""
        client = greeted(MemoryHandler(), clock)
        (reply,) = client.command(b"HELP")
        assert reply.startswith(b"214 2.0.0 ")
        commands = reply.split(b": ", 1)[1].split()
        assert b"BDAT" in commands and b"DATA" in commands
        assert b"STARTTLS" not in commands and b"AUTH" not in commands

    @pytest.mark.parametrize("space", [b"\t", b"  ", b" \t "])
    def test_debug_masks_auth_whatever_the_whitespace(
        self, clock: Clock, logged: list[dict[str, Any]], space: bytes
    ) -> None:
        """Before: a tab after AUTH PLAIN put the credentials in the log."""
        client = greeted(MemoryHandler(), clock, debug=True)
        secret = b"AGFsaWNlAHNlY3JldA=="
        client.command(b"AUTH" + space + b"PLAIN" + space + secret)
        text = "\n".join(map(formatEvent, logged))
        assert secret.decode() not in text
        assert "****" in text


def test_help_follows_tls_and_auth(clock: Clock) -> None:
    """Before STARTTLS: STARTTLS, no AUTH (it needs TLS); after: AUTH only."""
    from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse

    from twisted_smtpd.auth import AuthPolicy
    from twisted_smtpd.tls import TLSPolicy

    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
    client = greeted(
        MemoryHandler(),
        clock,
        tls=TLSPolicy(context_factory=object()),  # never used by the fake
        auth=AuthPolicy.from_checkers([checker]),
    )

    def commands() -> list[bytes]:
        (reply,) = client.command(b"HELP")
        return reply.split(b": ", 1)[1].split()

    before = commands()
    assert b"STARTTLS" in before and b"AUTH" not in before
    assert [b"220 2.0.0 Ready to start TLS"] == client.command(b"STARTTLS")
    client.command(b"EHLO client.example")
    after = commands()
    assert b"STARTTLS" not in after and b"AUTH" in after


@pytest_twisted.inlineCallbacks
def test_received_over_a_real_unix_socket(tmp_path: Any) -> Any:
    """A client on a real Unix socket: the trace says localhost, not repr()."""
    import socket

    from twisted.internet import reactor, threads

    memory = MemoryHandler()
    path = str(tmp_path / "smtpd.sock")
    port = reactor.listenUNIX(path, SMTPFactory(memory, hostname="mx.test"))

    def client() -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(15)
            sock.connect(path)
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(
                b"HELO local.client\r\nMAIL FROM:<a@b.example>\r\n"
                b"RCPT TO:<c@d.example>\r\nDATA\r\n"
            )
            for _ in range(4):
                reader.readline()
            sock.sendall(b"hi\r\n.\r\nQUIT\r\n")
            assert reader.readline().startswith(b"250 ")

    try:
        yield threads.deferToThread(client)
    finally:
        yield port.stopListening()
    (envelope,) = memory.messages
    assert envelope.received_header.startswith(
        b"Received: from local.client (localhost)\r\n"
    )


@pytest.mark.parametrize(
    "line", ["ma\u0131l FROM:<a@example.org>", "\u017fTARTTLS", "RSE\u0165"]
)
def test_a_verb_that_only_folds_to_a_command_is_unknown(
    clock: Clock, line: str
) -> None:
    """'maıl' upper-cases to 'MAIL' in Python: it must still get 500 5.5.2,
    not run MAIL (a filter before us reads no command in it)."""
    handler = MemoryHandler()
    client = connect(SMTPFactory(handler, hostname="mx.test", reactor=clock))
    client.replies()
    client.command(b"EHLO c.example")
    assert [b"500 5.5.2 Command not recognized"] == client.command(line.encode("utf-8"))
    assert client.command(b"RCPT TO:<b@example.org>")[0].startswith(b"503 ")
