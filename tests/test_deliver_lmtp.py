"""--deliver lmtp: into a real Dovecot LMTP server the tests start."""

from __future__ import annotations

import smtplib
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred

from twisted_smtpd.deliver import DeliverOptions, handler_from_target
from twisted_smtpd.deliver.lmtp import LMTPHandler

from .helpers import free_port, start_twistd, wait_for_port
from .mailservers import Dovecot
from .test_deliver_proxy import telling, vanish_after

USERS = ["alice", "bob", "carol", "dave", "erin", "full"]


@pytest.fixture(scope="module")
def dovecot():
    server = Dovecot(USERS, full=("full",))
    yield server
    server.stop()


@pytest.fixture
def lmtp_handler(dovecot):
    handler = LMTPHandler(f"tcp:127.0.0.1:{dovecot.port}", timeout=10, lhlo="mx.test")
    yield handler
    handler.pool.close()


def in_thread(fn, *args):
    return threads.deferToThread(fn, *args)


def body(subject: str, extra: bytes = b"") -> bytes:
    return (
        b"From: s@example.org\r\nTo: alice@example.net\r\n"
        b"Message-ID: <" + subject.encode() + b"@example.org>\r\n"
        b"Subject: " + subject.encode() + b"\r\n\r\nHello.\r\n" + extra
    )


def count(dovecot, user: str, subject: str) -> int:
    needle = f"Subject: {subject}\n".encode()
    return sum(needle in m for m in dovecot.messages(user))


@pytest_twisted.inlineCallbacks
def test_rcpt_refusal_is_the_clients_and_message_lands(listen, dovecot, lmtp_handler):
    """Dovecot's unknown user is the client's RCPT reply; the 250 after DATA
    comes once Dovecot saved the message for both known users."""
    port = listen(lmtp_handler)

    def client():
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.ehlo("client.example")
            assert 250 == smtp.mail("s@example.org")[0]
            assert 250 == smtp.rcpt("alice@example.net")[0]
            refused = smtp.rcpt("nosuchuser@example.net")
            assert 250 == smtp.rcpt("bob@example.net")[0]
            reply = smtp.data(body("first", b".leading dot\r\n"))
            return refused, reply

    refused, reply = yield in_thread(client)
    assert 550 == refused[0]
    assert b"5.1.1" in refused[1] and b"User doesn't exist" in refused[1]
    assert 250 == reply[0]
    for user in ("alice", "bob"):
        (message,) = [m for m in dovecot.messages(user) if b"Subject: first" in m]
        # Our trace header went first; dot-stuffing was undone by Dovecot.
        assert b"by mx.test (twisted_smtpd)" in message
        assert b"\n.leading dot\n" in message


@pytest_twisted.inlineCallbacks
def test_unix_socket_and_connection_reuse(listen, dovecot):
    """Two sessions one after the other share one pooled LMTP connection."""
    handler = handler_from_target(
        f"lmtp:unix:{dovecot.socket}", DeliverOptions(timeout=10), reactor
    )
    port = listen(handler)

    def client(subject):
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.sendmail("s@example.org", ["carol@example.net"], body(subject))

    try:
        yield in_thread(client, "reuse-1")
        yield in_thread(client, "reuse-2")
        assert 1 == handler.pool.open
        assert 1 == count(dovecot, "carol", "reuse-1")
        assert 1 == count(dovecot, "carol", "reuse-2")
    finally:
        handler.pool.close()


@pytest_twisted.inlineCallbacks
def test_rset_after_rcpt_resets_the_downstream(listen, dovecot, lmtp_handler):
    """RSET after RCPT: nothing delivered, and the LMTP connection goes back
    to the pool in a clean state for the next transaction."""
    port = listen(lmtp_handler)

    def client():
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.ehlo("client.example")
            smtp.mail("s@example.org")
            smtp.rcpt("dave@example.net")
            smtp.rset()
            smtp.sendmail("s@example.org", ["erin@example.net"], body("after-rset"))

    yield in_thread(client)
    assert [] == dovecot.messages("dave")
    assert 1 == count(dovecot, "erin", "after-rset")
    assert 1 == lmtp_handler.pool.open


@pytest_twisted.inlineCallbacks
def test_client_gone_after_rcpt_resets_the_downstream(listen, dovecot, lmtp_handler):
    """A client that vanishes after RCPT: Dovecot's transaction is reset at
    once (transaction_abandoned, no garbage collection involved) and the
    same LMTP connection delivers the next message."""
    released = telling(lmtp_handler, 1)
    port = listen(lmtp_handler)
    yield in_thread(
        vanish_after,
        port,
        [b"MAIL FROM:<s@example.org>", b"RCPT TO:<dave@example.net>"],
        2,  # gone once both are answered
    )
    envelope = yield released[0]
    assert ["dave@example.net"] == envelope.rcpt_tos
    assert 1 == lmtp_handler.pool.idle_count and 1 == lmtp_handler.pool.open

    def client():
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.sendmail("s@example.org", ["erin@example.net"], body("after-gone"))

    yield in_thread(client)
    assert [] == dovecot.messages("dave")
    assert 1 == count(dovecot, "erin", "after-gone")
    assert 1 == lmtp_handler.pool.open


@pytest_twisted.inlineCallbacks
def test_one_recipient_full_others_delivered(listen, dovecot, lmtp_handler):
    """LMTP's mixed result is never a plain 250: the reply names who got it."""
    port = listen(lmtp_handler)

    def client(recipients, subject):
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            try:
                smtp.sendmail("s@example.org", recipients, body(subject))
            except smtplib.SMTPDataError as error:
                return error.smtp_code, error.smtp_error
            return 250, b""

    code, text = yield in_thread(
        client, ["alice@example.net", "full@example.net", "bob@example.net"], "mixed"
    )
    assert 554 == code
    assert b"<alice@example.net>, <bob@example.net> only" in text
    assert b"<full@example.net>: 552 5.2.2" in text
    assert 1 == count(dovecot, "alice", "mixed")
    assert 1 == count(dovecot, "bob", "mixed")
    assert [] == dovecot.messages("full")
    # Only the full mailbox: Dovecot's own reply passes through.
    code, text = yield in_thread(client, ["full@example.net"], "only-full")
    assert 552 == code and b"5.2.2" in text and b"Quota exceeded" in text


@pytest_twisted.inlineCallbacks
def test_lmtp_killed_mid_data_then_client_retries(listen, dovecot, lmtp_handler):
    """Dovecot's LMTP process dies mid-DATA: 451, nothing stored; the
    client's retry stores exactly one copy."""
    port = listen(lmtp_handler)

    def client():
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            reader = sock.makefile("rb")

            def reply():
                while True:
                    line = reader.readline()
                    if line[3:4] != b"-":
                        return line

            reply()
            for line in (b"EHLO c.example", b"MAIL FROM:<s@example.org>"):
                sock.sendall(line + b"\r\n")
                assert reply().startswith(b"250")
            sock.sendall(b"RCPT TO:<alice@example.net>\r\n")
            assert reply().startswith(b"250")
            sock.sendall(b"DATA\r\n")
            assert reply().startswith(b"354")
            sock.sendall(body("killed")[:40])
            time.sleep(0.3)  # the first bytes are in Dovecot now
            assert dovecot.kill_lmtp_processes() >= 1
            time.sleep(0.3)
            sock.sendall(body("killed")[40:] + b".\r\n")
            final = reply()
            sock.sendall(b"QUIT\r\n")
            return final

    final = yield in_thread(client)
    assert final.startswith(b"451 4.4.2"), final
    assert 0 == count(dovecot, "alice", "killed")

    def retry():
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.sendmail("s@example.org", ["alice@example.net"], body("killed"))

    yield in_thread(retry)
    assert 1 == count(dovecot, "alice", "killed")


@pytest_twisted.inlineCallbacks
def test_big_message_streams_through(listen, dovecot, lmtp_handler):
    """5 MB with dot-leading lines arrives whole."""
    from twisted_smtpd import Limits

    port = listen(lmtp_handler, limits=Limits(max_message_size=64 * 1024 * 1024))
    line = b".dot and some text to make a line of mail long enough\r\n"
    payload = line * (5 * 1024 * 1024 // len(line))

    def client():
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.sendmail("s@example.org", ["dave@example.net"], body("big", payload))

    yield in_thread(client)
    (message,) = [m for m in dovecot.messages("dave") if b"Subject: big" in m]
    assert payload.replace(b"\r\n", b"\n") in message


def test_twistd_deliver_lmtp(tmp_path, dovecot):
    """The command line: twistd smtpd --deliver lmtp:unix:... delivers."""
    port = free_port()
    proc = start_twistd(
        tmp_path,
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        "--deliver",
        f"lmtp:unix:{dovecot.socket}",
        "--deliver-timeout",
        "10",
    )
    try:
        wait_for_port(port, proc)
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.sendmail("s@example.org", ["erin@example.net"], body("twistd"))
            smtp.mail("s@example.org")
            assert 550 == smtp.rcpt("nosuchuser@example.net")[0]
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=20)
    assert 1 == count(dovecot, "erin", "twistd"), output


@pytest_twisted.inlineCallbacks
def test_finish_each_gives_dovecots_reply_per_recipient(dovecot, lmtp_handler):
    """For a server that answers LMTP itself: one reply per recipient, as
    Dovecot gave them (the hook API driven directly)."""
    from twisted.internet.address import IPv4Address

    from twisted_smtpd._session import Envelope

    envelope = Envelope(
        session_id="T1",
        peer=IPv4Address("TCP", "127.0.0.1", 1),
        helo="client.example",
        esmtp=True,
        tls=None,
        auth=None,
        mail_from="s@example.org",
    )
    yield Deferred.fromCoroutine(lmtp_handler.check_sender(envelope))
    recipients = ["alice@example.net", "full@example.net", "bob@example.net"]
    for address in recipients:
        yield Deferred.fromCoroutine(
            lmtp_handler.check_recipient(envelope, address, {})
        )
    receiver = lmtp_handler.open_message(envelope)
    receiver.write(body("each"))
    results = yield receiver.finish_each()
    assert recipients == [address for address, _ in results]
    assert [250, 552, 250] == [reply.code for _, reply in results]
    assert "5.2.2" == results[1][1].enhanced
    assert 1 == count(dovecot, "alice", "each") == count(dovecot, "bob", "each")


def _lmtp_dialogue(port: int, recipients: list[str], subject: str) -> list[bytes]:
    """A raw LMTP client: the reply lines after the data, one per recipient."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        reader = sock.makefile("rb")

        def reply() -> bytes:
            while True:
                line = reader.readline()
                if line[3:4] != b"-":
                    return line

        assert reply().startswith(b"220")
        sock.sendall(b"LHLO client.test\r\n")
        assert reply().startswith(b"250")
        sock.sendall(b"MAIL FROM:<s@example.org>\r\n")
        assert reply().startswith(b"250")
        for recipient in recipients:
            sock.sendall(f"RCPT TO:<{recipient}>\r\n".encode())
            assert reply().startswith(b"250")
        sock.sendall(b"DATA\r\n")
        assert reply().startswith(b"354")
        sock.sendall(body(subject) + b".\r\n")
        replies = [reply() for _ in recipients]
        sock.sendall(b"QUIT\r\n")
        return replies


@pytest_twisted.inlineCallbacks
def test_lmtp_server_passes_each_recipients_reply_through(
    listen, dovecot, lmtp_handler
):
    """Serving LMTP in front of Dovecot, each recipient gets Dovecot's own
    reply after the data: 250 for the two it stored, its 552 for the full
    mailbox (no 554 summary, no retry of the stored ones)."""
    port = listen(lmtp_handler, lmtp=True)
    replies = yield in_thread(
        _lmtp_dialogue,
        port,
        ["alice@example.net", "full@example.net", "bob@example.net"],
        "lmtp-each",
    )
    assert replies[0].startswith(b"250 "), replies
    assert replies[1].startswith(b"552 5.2.2"), replies
    assert replies[2].startswith(b"250 "), replies
    assert 1 == count(dovecot, "alice", "lmtp-each")
    assert 1 == count(dovecot, "bob", "lmtp-each")
    assert [] == dovecot.messages("full")
