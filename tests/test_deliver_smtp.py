"""--deliver smtp: through a private Postfix, and through our own server
where a fault must be staged (slow, AUTH, implicit TLS)."""

from __future__ import annotations

import smtplib
import socket
import time

import pytest
import pytest_twisted
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred

from twisted_smtpd.auth import AuthPolicy
from twisted_smtpd.deliver import DeliverOptions, handler_from_target
from twisted_smtpd.deliver.smtp import SMTPRelayHandler
from twisted_smtpd.handlers import MemoryHandler
from twisted_smtpd.tls import TLSPolicy

from .certs import make_certificates
from .helpers import free_port, twistd_start_error
from .mailservers import Postfix


@pytest.fixture(scope="module")
def postfix(certificates):
    server = Postfix(
        ["alice", "bob", "carol", "dave"],
        cert=certificates["cert"],
        key=certificates["key"],
    )
    yield server
    server.stop()


@pytest.fixture
def handlers():
    made = []

    def make(endpoint, **kwargs):
        kwargs.setdefault("timeout", 10)
        kwargs.setdefault("helo", "mx.test")
        handler = SMTPRelayHandler(endpoint, **kwargs)
        made.append(handler)
        return handler

    yield make
    for handler in made:
        handler.pool.close()


def in_thread(fn, *args):
    return threads.deferToThread(fn, *args)


def body(subject: str) -> bytes:
    return (
        b"From: s@example.org\r\nTo: alice@example.net\r\nSubject: "
        + subject.encode()
        + b"\r\n\r\nHello.\r\n.dot line\r\n"
    )


def send(port, recipients, subject):
    """smtplib sendmail: (code, text) of the final reply or first refusal."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        try:
            refused = smtp.sendmail("s@example.org", recipients, body(subject))
        except smtplib.SMTPRecipientsRefused as error:
            return error.recipients
        except smtplib.SMTPResponseException as error:
            return error.smtp_code, error.smtp_error
        return 250, refused


@pytest_twisted.inlineCallbacks
def test_relay_through_postfix(listen, postfix, handlers):
    """Postfix's refusals are the client's RCPT replies; its 250 the client's."""
    port = listen(handlers(f"tcp:127.0.0.1:{postfix.port}"))

    def client():
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.ehlo("client.example")
            smtp.mail("s@example.org")
            replies = [
                smtp.rcpt(address)
                for address in (
                    "alice@example.net",
                    "nobody@example.net",
                    "x@elsewhere.example",
                    "bob@example.net",
                )
            ]
            return replies, smtp.data(body("relayed"))

    replies, final = yield in_thread(client)
    assert [250, 550, 554, 250] == [code for code, _ in replies]
    assert b"5.1.1" in replies[1][1] and b"User unknown" in replies[1][1]
    assert b"5.7.1" in replies[2][1] and b"Relay access denied" in replies[2][1]
    assert 250 == final[0]
    for user in ("alice", "bob"):
        (message,) = yield in_thread(postfix.wait_for_messages, user, 1)
        assert b"Subject: relayed" in message
        assert b"by mx.test (twisted_smtpd)" in message
        assert b"\n.dot line\n" in message


@pytest_twisted.inlineCallbacks
def test_starttls_verified_against_deliver_ca(listen, postfix, certificates):
    """tls=required: STARTTLS, the certificate checked against --deliver-ca."""
    handler = handler_from_target(
        f"smtp:tcp:127.0.0.1:{postfix.port}:tls=required:tls-name=localhost",
        DeliverOptions(timeout=10, ca_file=str(certificates["ca"])),
        reactor,
    )
    port = listen(handler)
    try:
        result = yield in_thread(send, port, ["carol@example.net"], "over-tls")
        assert 250 == result[0]
        (message,) = yield in_thread(postfix.wait_for_messages, "carol", 1)
        # Postfix notes the TLS session in its own Received: header.
        assert b"(using TLS" in message
    finally:
        handler.pool.close()


@pytest_twisted.inlineCallbacks
def test_starttls_with_an_untrusted_certificate(listen, postfix, tmp_path, handlers):
    """A certificate from another CA: 451 4.7.5 at MAIL, nothing sent."""
    other = make_certificates(tmp_path)
    handler = handlers(
        f"tcp:127.0.0.1:{postfix.port}",
        tls="required",
        tls_name="localhost",
        ca_file=str(other["ca"]),
    )
    port = listen(handler)

    def client():
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.ehlo("client.example")
            return smtp.mail("s@example.org")

    code, text = yield in_thread(client)
    assert 451 == code and text.startswith(b"4.7.5 TLS with next hop"), text
    assert 0 == handler.pool.open


@pytest_twisted.inlineCallbacks
def test_postfix_killed_mid_data(listen, postfix, handlers):
    """Postfix's smtpd dies mid-DATA: 451, nothing queued; the retry lands once."""
    port = listen(handlers(f"tcp:127.0.0.1:{postfix.port}"))
    data = body("killed-mid-data")

    def client():
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            reader = sock.makefile("rb")

            def reply():
                while True:
                    line = reader.readline()
                    if line[3:4] != b"-":
                        return line

            reply()
            for line in (
                b"EHLO c.example",
                b"MAIL FROM:<s@example.org>",
                b"RCPT TO:<dave@example.net>",
            ):
                sock.sendall(line + b"\r\n")
                assert reply().startswith(b"250")
            sock.sendall(b"DATA\r\n")
            assert reply().startswith(b"354")
            sock.sendall(data[:30])
            time.sleep(0.3)
            assert postfix.kill_smtpd_processes() >= 1
            time.sleep(0.3)
            sock.sendall(data[30:] + b".\r\n")
            return reply()

    final = yield in_thread(client)
    assert final.startswith(b"451 4.4.2"), final
    yield in_thread(time.sleep, 1)
    assert [] == postfix.messages("dave")
    assert 250 == (yield in_thread(send, port, ["dave@example.net"], "retried"))[0]
    (message,) = yield in_thread(postfix.wait_for_messages, "dave", 1)
    assert b"Subject: retried" in message


# -- faults staged with our own server as the next hop ---------------------------
class SlowHandler:
    """Takes RCPT and the message only after C{release} fires; records aborts."""

    def __init__(self, slow_rcpt: bool = False) -> None:
        self.slow_rcpt = slow_rcpt
        self.stored: list[bytes] = []
        self.aborted = 0

    def check_recipient(self, envelope, address, options):
        if self.slow_rcpt:
            return Deferred()

    def open_message(self, envelope):
        handler = self

        class Receiver:
            chunks: list[bytes] = []

            def write(self, data):
                self.chunks.append(data)

            def finish(self):
                return Deferred()  # never: the next hop hangs after the dot

            def abort(self):
                handler.aborted += 1

        return Receiver()


@pytest_twisted.inlineCallbacks
def test_slow_next_hop_after_data_is_451(listen, handlers):
    """The next hop does not answer the dot within --deliver-timeout: 451,
    and the next hop dropped the message when we hung up."""
    slow = SlowHandler()
    downstream = listen(slow)
    port = listen(handlers(f"tcp:127.0.0.1:{downstream}", timeout=1))
    result = yield in_thread(send, port, ["a@example.net"], "slow")
    assert 451 == result[0] and result[1].startswith(b"4.4.2"), result
    for _ in range(50):
        if slow.aborted:
            break
        yield in_thread(time.sleep, 0.05)
    assert 1 == slow.aborted and [] == slow.stored


@pytest_twisted.inlineCallbacks
def test_slow_next_hop_at_rcpt_is_451(listen, handlers):
    downstream = listen(SlowHandler(slow_rcpt=True))
    port = listen(handlers(f"tcp:127.0.0.1:{downstream}", timeout=1))
    result = yield in_thread(send, port, ["a@example.net"], "slow-rcpt")
    code, text = result["a@example.net"]
    assert 451 == code and text.startswith(b"4.4.2"), result


@pytest_twisted.inlineCallbacks
def test_next_hop_down_is_451_at_mail(listen, handlers):
    closed = free_port()
    port = listen(handlers(f"tcp:127.0.0.1:{closed}", timeout=2))

    def client():
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.ehlo("client.example")
            return smtp.mail("s@example.org")

    code, text = yield in_thread(client)
    assert 451 == code and b"4.4.1" in text and b"connection refused" in text


def _auth_policy():
    users = InMemoryUsernamePasswordDatabaseDontUse()
    users.addUser(b"relayuser", b"s3cret")
    return AuthPolicy.from_checkers([users])


@pytest_twisted.inlineCallbacks
def test_implicit_tls_and_auth_from_password_file(
    listen, certificates, tmp_path, handlers
):
    """tls=implicit (port 465 style) with AUTH; the password from a file."""
    memory = MemoryHandler()
    policy = TLSPolicy.from_files(str(certificates["cert"]), str(certificates["key"]))
    downstream = listen(
        memory, ssl_context=policy.context_factory, tls=policy, auth=_auth_policy()
    )
    secret = tmp_path / "relay.pw"
    secret.write_text("s3cret\n")
    handler = handler_from_target(
        f"smtp:tcp:127.0.0.1:{downstream}:tls=implicit:tls-name=localhost"
        f":user=relayuser:password-file={secret}",
        DeliverOptions(timeout=10, ca_file=str(certificates["ca"])),
        reactor,
    )
    port = listen(handler)
    try:
        result = yield in_thread(send, port, ["a@example.net"], "implicit")
        assert 250 == result[0], result
        (envelope,) = memory.messages
        assert envelope.tls is not None and envelope.auth is not None
        assert b"Subject: implicit" in envelope.content
    finally:
        handler.pool.close()


@pytest_twisted.inlineCallbacks
def test_wrong_password_is_451(listen, certificates, handlers):
    memory = MemoryHandler()
    policy = TLSPolicy.from_files(str(certificates["cert"]), str(certificates["key"]))
    downstream = listen(memory, tls=policy, auth=_auth_policy())
    handler = handlers(
        f"tcp:127.0.0.1:{downstream}",
        tls="required",
        tls_name="localhost",
        ca_file=str(certificates["ca"]),
        user="relayuser",
        password="wrong",
    )
    port = listen(handler)
    result = yield in_thread(send, port, ["a@example.net"], "bad-auth")
    assert 451 == result[0] and b"4.7.0" in result[1] and b"AUTH" in result[1]
    assert [] == memory.messages


@pytest.mark.parametrize(
    "target, words",
    [
        ("smtp:", "expected smtp:ENDPOINT"),
        ("smtp:ssl:host:465", "must be tcp:HOST:PORT"),
        ("smtp:tcp:relay.example:25:tls=maybe", "tls='maybe'"),
        ("smtp:tcp:relay.example:25:user=x", "go together"),
        ("smtp:tcp:relay.example:25:user=x:password-file=/nonexistent", "cannot read"),
        ("lmtp:tcp:127.0.0.1:24:pool=0", "pool="),
    ],
)
def test_bad_targets_are_one_sentence(target, words):
    with pytest.raises(ValueError) as error:
        handler_from_target(target, DeliverOptions(), reactor)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_password_without_tls_to_a_remote_host_is_refused(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("x")
    with pytest.raises(ValueError, match="without TLS"):
        handler_from_target(
            f"smtp:tcp:relay.example:25:tls=none:user=u:password-file={secret}",
            DeliverOptions(),
            reactor,
        )


def test_twistd_refuses_a_bad_target_in_one_line(tmp_path):
    status, lines = twistd_start_error(
        tmp_path, "--deliver", "smtp:tcp:relay.example:25:tls=maybe"
    )
    assert 0 != status
    assert any("tls='maybe'" in line for line in lines), lines
    assert not any("Traceback" in line for line in lines), lines
