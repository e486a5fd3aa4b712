"""End to end: real loopback sockets, real clients (smtplib, Twisted's client)."""

from __future__ import annotations

import signal
import smtplib
import socket
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.mail.smtp import sendmail as twisted_sendmail

from twisted_smtpd import Limits
from twisted_smtpd.handlers import MaildirHandler

from .helpers import free_port, start_twistd, twistd_start_error, wait_for_port


def in_thread(fn, *args):
    """Run blocking client code off the reactor thread."""
    return threads.deferToThread(fn, *args)


def message(subject: str, body: str = "Hello.\n.leading dot\n") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = "rcpt@example.net"
    msg["Subject"] = subject
    msg.set_content(body)
    return msg


@pytest_twisted.inlineCallbacks
def test_many_messages_per_session(listen, memory):
    """One smtplib session delivers 50 messages, each intact."""
    port = listen(memory)

    def client():
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            for i in range(50):
                smtp.send_message(message(f"m{i}"))

    yield in_thread(client)
    assert [f"m{i}" for i in range(50)] == [
        e.content.split(b"Subject: ")[1].split(b"\r\n")[0].decode()
        for e in memory.messages
    ]
    assert b".leading dot\r\n" in memory.messages[0].content


@pytest_twisted.inlineCallbacks
def test_pipelining_raw_socket(listen, memory):
    """A whole session written in one packet gets every reply, in order."""
    port = listen(memory)
    batch = (
        b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
        b"RCPT TO:<e@f.example>\r\nDATA\r\nline one\r\n..two\r\n.\r\n"
        b"MAIL FROM:<>\r\nRCPT TO:<g@h.example>\r\nDATA\r\nsecond\r\n.\r\nQUIT\r\n"
    )

    def client():
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(10)
            sock.recv(1024)
            sock.sendall(batch)
            data = b""
            while not data.endswith(b"221 2.0.0 Bye\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data

    data = yield in_thread(client)
    finals = [line[:3] for line in data.split(b"\r\n") if line[3:4] == b" "]
    assert [b"250", b"250", b"250", b"250", b"354", b"250"] + [
        b"250",
        b"250",
        b"354",
        b"250",
        b"221",
    ] == finals
    assert [b"line one\r\n.two\r\n", b"second\r\n"] == [
        e.content for e in memory.messages
    ]
    assert "" == memory.messages[1].mail_from


@pytest_twisted.inlineCallbacks
def test_twenty_megabyte_message(listen, memory):
    """A 20 MB message arrives byte for byte."""
    port = listen(memory, limits=Limits(max_message_size=64 * 1024 * 1024))
    line = b"0123456789" * 9 + b"\r\n"
    body = line * (20 * 1024 * 1024 // len(line))

    def client():
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.sendmail("a@b.example", ["c@d.example"], body)

    yield in_thread(client)
    assert body == memory.messages[0].content


@pytest_twisted.inlineCallbacks
def test_size_limit_over_socket(listen, memory):
    """Over the limit, smtplib sees 552 and the session is still usable."""
    port = listen(memory, limits=Limits(max_message_size=1000))

    def client():
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            # No SIZE= declared, so only the check while reading DATA can fire.
            smtp.ehlo()
            assert 250 == smtp.mail("a@b.example")[0]
            assert 250 == smtp.rcpt("c@d.example")[0]
            code = smtp.data(b"x" * 5000)[0]
            smtp.sendmail("a@b.example", ["c@d.example"], b"small\r\n")
            return code

    assert 552 == (yield in_thread(client))
    assert [b"small\r\n"] == [e.content for e in memory.messages]


@pytest_twisted.inlineCallbacks
def test_hundred_concurrent_sessions(listen, memory):
    """100 clients at once each deliver their message."""
    port = listen(memory)

    def one(i):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.sendmail("a@b.example", [f"r{i}@d.example"], f"n={i}\r\n")

    def client():
        with ThreadPoolExecutor(100) as pool:
            list(pool.map(one, range(100)))

    yield in_thread(client)
    assert {f"r{i}@d.example" for i in range(100)} == {
        e.rcpt_tos[0] for e in memory.messages
    }


@pytest_twisted.inlineCallbacks
def test_twisted_smtp_client(listen, memory):
    """Twisted's own SMTP client delivers to the server."""
    port = listen(memory)
    yield twisted_sendmail(
        "127.0.0.1",
        "a@b.example",
        ["c@d.example"],
        b"Subject: from twisted\r\n\r\nbody\r\n",
        port=port,
        requireAuthentication=False,
        requireTransportSecurity=False,
    )
    assert b"Subject: from twisted" in memory.messages[0].content


@pytest_twisted.inlineCallbacks
def test_maildir_delivery(listen, tmp_path):
    """The Maildir handler writes Return-Path, Received and the body into new/."""
    maildir = MaildirHandler(str(tmp_path / "Maildir"))
    port = listen(maildir)

    def client():
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.sendmail("a@b.example", ["c@d.example"], b"Subject: x\r\n\r\nhi\r\n")
            big = b"y" * 100 + b"\r\n"
            smtp.sendmail("a@b.example", ["c@d.example"], big * 20000)

    yield in_thread(client)
    files = sorted(
        (tmp_path / "Maildir" / "new").iterdir(), key=lambda p: p.stat().st_size
    )
    assert 2 == len(files)
    assert [] == list((tmp_path / "Maildir" / "tmp").iterdir())
    small = files[0].read_bytes()
    assert small.startswith(b"Return-Path: <a@b.example>\r\nReceived: from ")
    assert small.endswith(b"\r\n\r\nSubject: x\r\n\r\nhi\r\n") or small.endswith(
        b"Subject: x\r\n\r\nhi\r\n"
    )
    assert files[1].read_bytes().endswith(b"y" * 100 + b"\r\n") and (
        files[1].stat().st_size > 2_000_000
    )


def test_twistd_plugin_delivers_into_maildir(tmp_path) -> None:
    """`twistd -n smtpd` as a user runs it: a message lands in the Maildir."""
    port = free_port()
    maildir = tmp_path / "Maildir"
    proc = start_twistd(
        tmp_path,
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        "--maildir",
        str(maildir),
        "--hostname",
        "mx.test",
    )
    try:
        wait_for_port(port, proc)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            code, banner = smtp.ehlo()
            assert 250 == code and banner.startswith(b"mx.test")
            smtp.sendmail(
                "a@b.example", ["c@d.example"], b"Subject: plugin\r\n\r\nok\r\n"
            )
        files = list((maildir / "new").iterdir())
        assert 1 == len(files)
        assert files[0].read_bytes().endswith(b"Subject: plugin\r\n\r\nok\r\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    assert "message" in output and "accepted" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--port", "nonsense:1"], "bad --port 'nonsense:1'"),
        (["--handler", "no.such.module.handler"], "cannot load --handler"),
        (["--max-recipients", "many"], "--max-recipients must be a whole number"),
        (
            ["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.pem"],
            "cannot read TLS certificate",
        ),
        (["--tls-cert", "/etc/hostname"], "--tls-cert and --tls-key go together"),
        (["--require-tls"], "--require-tls needs --tls-cert and --tls-key"),
        (["--bogus"], "option --bogus not recognized"),
    ],
)
def test_twistd_bad_options_one_line(tmp_path, args, expected) -> None:
    """Bad options stop twistd at start-up with one clear line, no traceback."""
    status, lines = twistd_start_error(tmp_path, *args)
    assert 0 != status
    assert 1 == len(lines), lines
    assert expected in lines[0]


@pytest_twisted.inlineCallbacks
def test_bdat_over_socket_into_maildir(listen, tmp_path):
    """Pipelined BDAT chunks (one of 3 MB) land in the Maildir byte for byte."""
    maildir = MaildirHandler(str(tmp_path / "Maildir"))
    port = listen(maildir)
    body = bytes(range(256)) * (3 * 4096) + b"\r\n.\r\n"  # binary; no end marker

    def client():
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(
                b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n"
                b"RCPT TO:<c@d.example>\r\n"
                + b"BDAT %d\r\n" % len(body)
                + body
                + b"BDAT 4 LAST\r\nend!QUIT\r\n"
            )
            lines = []
            while True:
                line = reader.readline()
                if not line:
                    break
                lines.append(line)
            return lines

    lines = yield in_thread(client)
    finals = [line[:4] for line in lines if line[3:4] == b" "]
    assert [b"250 ", b"250 ", b"250 ", b"250 ", b"250 ", b"221 "] == finals
    assert b"CHUNKING" in b"".join(lines)
    files = list((tmp_path / "Maildir" / "new").iterdir())
    assert 1 == len(files)
    stored = files[0].read_bytes()
    assert stored.startswith(b"Return-Path: <a@b.example>\r\nReceived: from ")
    assert stored.endswith(b"\r\n" + body + b"end!")


@pytest_twisted.inlineCallbacks
def test_dsn_parameters_reach_the_handler(listen, memory):
    """smtplib's DSN options pass through to a handler that honours DSN."""
    memory.supports_dsn = True
    port = listen(memory)

    def client():
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.ehlo()
            assert smtp.has_extn("dsn")
            smtp.sendmail(
                "a@b.example",
                ["c@d.example"],
                b"x\r\n",
                mail_options=["RET=HDRS", "ENVID=QQ1"],
                rcpt_options=["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;c@d.example"],
            )

    yield in_thread(client)
    envelope = memory.messages[0]
    assert ("HDRS", "QQ1") == (
        envelope.mail_options["RET"],
        envelope.mail_options["ENVID"],
    )
    assert [{"NOTIFY": "FAILURE,DELAY", "ORCPT": "rfc822;c@d.example"}] == (
        envelope.rcpt_options
    )
