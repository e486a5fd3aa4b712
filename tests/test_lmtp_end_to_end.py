"""LMTP with real clients: Postfix's lmtp(8) and smtplib.LMTP, over real sockets.

C{twistd -n smtpd --lmtp} listens on a unix socket and delivers into one
Maildir per recipient; a private Postfix hands mail to it.  A recipient
whose Maildir can't be written is deferred by Postfix on our 451 while the
others are delivered once, and is delivered on Postfix's retry.
"""

from __future__ import annotations

import os
import smtplib
import socket
import tempfile
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from twisted_smtpd import Limits

from .helpers import start_twistd
from .mailservers import maildir_messages
from .postfix_lmtp import PostfixToLMTP


def _wait_for_socket(path: Path, proc, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"twistd exited early: {proc.stdout.read()!r}")
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("twistd did not listen on its unix socket")


@pytest.fixture(scope="module")
def lmtpd():
    """twistd smtpd --lmtp on a unix socket, one Maildir per local part."""
    root = Path(tempfile.mkdtemp(prefix="lmtpd-"))
    root.chmod(0o755)  # Postfix's lmtp(8) runs as postfix
    sock = root / "lmtp.sock"
    mail = root / "mail"
    proc = start_twistd(
        root,
        "--lmtp",
        "--hostname",
        "lmtp.test",
        "--port",
        f"unix:{sock}:mode=666",
        "--maildir",
        f"{mail}/{{local}}",
    )
    try:
        _wait_for_socket(sock, proc)
        yield sock, mail
    finally:
        proc.terminate()
        proc.communicate(timeout=20)  # and closes its output pipe


@pytest.fixture(scope="module")
def postfix(lmtpd):
    sock, _ = lmtpd
    relay = PostfixToLMTP(f"unix:{sock}")
    yield relay
    relay.stop()


def subjects(maildir: Path) -> list[bytes]:
    found = []
    for message in maildir_messages(maildir):
        for line in message.split(b"\n"):
            if line.startswith(b"Subject: "):
                found.append(line[len(b"Subject: ") :].rstrip(b"\r"))
    return found


def test_postfix_delivers_per_recipient(postfix, lmtpd) -> None:
    """Postfix's lmtp(8) gets one reply per recipient: alice and bob sent,
    blocked (its Maildir path is a file) deferred with our 451; after the
    block goes, Postfix's retry delivers blocked only, once."""
    _, mail = lmtpd
    mail.mkdir(exist_ok=True)
    (mail / "blocked").write_bytes(b"in the way")
    recipients = ["alice@example.net", "blocked@example.net", "bob@example.net"]
    queue_id, refused = postfix.send(
        "sender@example.org",
        recipients,
        b"Subject: per-recipient\r\nFrom: sender@example.org\r\n\r\nHello.\r\n",
    )
    assert {} == refused
    statuses = postfix.wait_for_statuses(queue_id, recipients)
    for user in ("alice", "bob"):
        (sent,) = statuses[f"{user}@example.net"]
        assert sent.startswith(f"status=sent (250 2.0.0 <{user}@example.net> OK: ")
        assert [b"per-recipient"] == subjects(mail / user)
    (deferred,) = statuses["blocked@example.net"]
    assert deferred.startswith("status=deferred")
    assert "451 4.3.0" in deferred and "in reply to end of DATA" in deferred
    assert queue_id in postfix.queue()
    # The way clears: Postfix retries blocked alone.
    (mail / "blocked").unlink()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len(postfix.statuses(queue_id).get("blocked@example.net", [])) >= 2:
            break
        time.sleep(0.1)
    final = postfix.statuses(queue_id)["blocked@example.net"][-1]
    assert final.startswith("status=sent (250 2.0.0 <blocked@example.net> OK: ")
    assert [b"per-recipient"] == subjects(mail / "blocked")
    for user in ("alice", "bob"):
        assert [b"per-recipient"] == subjects(mail / user)  # not delivered twice
    # Our trace header names the protocol (RFC 3848).
    (message,) = maildir_messages(mail / "alice")
    assert b"by lmtp.test (twisted_smtpd) with LMTP" in message.replace(b"\n\t", b" ")


def test_smtplib_lmtp_over_the_unix_socket(lmtpd) -> None:
    """smtplib.LMTP: LHLO, EHLO refused, one reply per recipient after DATA."""
    sock, mail = lmtpd
    with smtplib.LMTP(str(sock)) as client:
        code, _ = client.docmd("EHLO", "client.test")
        assert 500 == code
        code, lines = client.ehlo("client.test")  # smtplib.LMTP sends LHLO
        assert 250 == code and b"PIPELINING" in lines
        assert 250 == client.mail("s@example.org")[0]
        assert 250 == client.rcpt("carol@example.net")[0]
        assert 250 == client.rcpt("dave@example.net")[0]
        first = client.data(b"Subject: smtplib\r\n\r\nHi.\r\n")
        second = client.getreply()
    assert 250 == first[0] and first[1].startswith(b"2.0.0 <carol@example.net> OK")
    assert 250 == second[0] and second[1].startswith(b"2.0.0 <dave@example.net> OK")
    assert [b"smtplib"] == subjects(mail / "carol")
    assert [b"smtplib"] == subjects(mail / "dave")


class _Hung:
    """check_sender never answers; a recipient can still be checked."""

    def __init__(self) -> None:
        self.cancelled = 0

    def check_sender(self, envelope):
        if envelope.mail_from == "hang@example.org":
            return defer.Deferred(lambda _: self._cancelled())
        return None

    def _cancelled(self) -> None:
        self.cancelled += 1

    def handle_message(self, envelope):
        return None


@pytest_twisted.inlineCallbacks
def test_hung_handler_over_a_real_socket(listen) -> None:
    """A hook that never answers gets 451 4.3.0 at the deadline and the
    client's session goes on (the next MAIL, a message, QUIT)."""
    handler = _Hung()
    port = listen(handler, limits=Limits(handler_timeout=0.5), lmtp=True)

    def client():
        with smtplib.LMTP("127.0.0.1", port) as lmtp:
            lmtp.ehlo("client.test")
            hung = lmtp.mail("hang@example.org")
            assert 250 == lmtp.mail("s@example.org")[0]
            assert 250 == lmtp.rcpt("a@example.net")[0]
            stored = lmtp.data(b"Subject: after\r\n\r\nx\r\n")
            return hung, stored

    hung, stored = yield threads.deferToThread(client)
    assert (451, b"4.3.0 Requested action aborted: handler timed out") == hung
    assert 250 == stored[0]
    assert 1 == handler.cancelled


def test_lmtp_over_tcp_with_twistd(tmp_path) -> None:
    """--lmtp works on a TCP --port too."""
    from .helpers import free_port, wait_for_port

    port = free_port()
    proc = start_twistd(
        tmp_path,
        "--lmtp",
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        "--maildir",
        str(tmp_path / "{domain}"),
    )
    try:
        wait_for_port(port, proc)
        with smtplib.LMTP("127.0.0.1", port) as client:
            client.ehlo("client.test")
            client.mail("s@example.org")
            client.rcpt("a@one.example")
            client.rcpt("b@two.example")
            replies = [client.data(b"Subject: tcp\r\n\r\nx\r\n"), client.getreply()]
    finally:
        proc.terminate()
        proc.communicate(timeout=20)  # and closes its output pipe
    assert [250, 250] == [code for code, _ in replies]
    assert [b"tcp"] == subjects(tmp_path / "one.example")
    assert [b"tcp"] == subjects(tmp_path / "two.example")
    assert not os.path.exists(tmp_path / "Maildir")
