"""AUTH: SASL PLAIN, LOGIN and CRAM-MD5 over twisted.cred."""

from __future__ import annotations

import hmac
import smtplib
from base64 import b64decode, b64encode

import pytest
import pytest_twisted
from twisted.cred.checkers import (
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import Portal
from twisted.internet import threads
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

from twisted_smtpd import SMTPFactory
from twisted_smtpd.auth import AuthPolicy, IdentityRealm
from twisted_smtpd.testing import connect
from twisted_smtpd.tls import TLSPolicy

from .helpers import free_port, start_twistd, wait_for_port


def b64(data: bytes) -> bytes:
    return b64encode(data)


def checker() -> InMemoryUsernamePasswordDatabaseDontUse:
    db = InMemoryUsernamePasswordDatabaseDontUse()
    db.addUser(b"alice", b"secret")
    return db


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_client(memory, clock, tls=None, **policy):
    policy.setdefault("allow_without_tls", True)
    auth = AuthPolicy.from_checkers([checker()], **policy)
    factory = SMTPFactory(memory, hostname="mx.test", reactor=clock, auth=auth, tls=tls)
    client = connect(factory)
    client.replies()
    client.command(b"EHLO c.example")
    return client


class TestMechanisms:
    def test_advertised(self, memory, clock) -> None:
        """EHLO lists the mechanisms the checker can verify."""
        client = make_client(memory, clock)
        assert b"250-AUTH PLAIN LOGIN CRAM-MD5" in client.command(b"EHLO c.example")

    def test_plain_initial_response(self, memory, clock) -> None:
        """PLAIN with an initial response: 235, and the envelope knows who."""
        client = make_client(memory, clock)
        assert [b"235 2.7.0 Authentication successful"] == client.command(
            b"AUTH PLAIN " + b64(b"\0alice\0secret")
        )
        client.command(b"MAIL FROM:<a@b.example> AUTH=<>")
        client.command(b"RCPT TO:<c@d.example>")
        client.command(b"DATA")
        client.command(b"hi\r\n.")
        envelope = memory.messages[0]
        assert "alice" == envelope.auth
        assert b"with ESMTPA id" in envelope.received_header
        assert "<>" == envelope.mail_options["AUTH"]

    def test_plain_continuation(self, memory, clock) -> None:
        """PLAIN without initial response gets an empty 334 challenge."""
        client = make_client(memory, clock)
        assert [b"334 "] == client.command(b"AUTH PLAIN")
        assert [b"235 2.7.0 Authentication successful"] == client.command(
            b64(b"alice\0alice\0secret")
        )

    def test_login(self, memory, clock) -> None:
        """LOGIN asks for user name then password."""
        client = make_client(memory, clock)
        assert [b"334 " + b64(b"Username:")] == client.command(b"AUTH LOGIN")
        assert [b"334 " + b64(b"Password:")] == client.command(b64(b"alice"))
        assert [b"235 2.7.0 Authentication successful"] == client.command(
            b64(b"secret")
        )

    def test_cram_md5(self, memory, clock) -> None:
        """CRAM-MD5 verifies an HMAC of the server's challenge."""
        client = make_client(memory, clock)
        reply = client.command(b"AUTH CRAM-MD5")[0]
        assert reply.startswith(b"334 ")
        challenge = b64decode(reply[4:])
        assert challenge.startswith(b"<") and challenge.endswith(b"@mx.test>")
        digest = hmac.new(b"secret", challenge, "md5").hexdigest().encode()
        assert [b"235 2.7.0 Authentication successful"] == client.command(
            b64(b"alice " + digest)
        )

    def test_cram_md5_needs_a_capable_checker(self, memory, clock) -> None:
        """CRAM-MD5 is not offered when no checker can verify it."""

        @implementer(ICredentialsChecker)
        class PlainOnly:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials):
                return checker().requestAvatarId(credentials)

        policy = AuthPolicy(
            Portal(IdentityRealm(), [PlainOnly()]), allow_without_tls=True
        )
        assert ["PLAIN", "LOGIN"] == policy.mechanisms


class TestFailures:
    def test_wrong_password_is_delayed(self, memory, clock) -> None:
        """Bad credentials get 535 5.7.8, only after the failure delay."""
        client = make_client(memory, clock)
        assert [] == client.command(b"AUTH PLAIN " + b64(b"\0alice\0wrong"))
        clock.advance(1)
        assert [b"535 5.7.8 Authentication credentials invalid"] == client.replies()
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")

    def test_too_many_failures(self, memory, clock) -> None:
        """After max_failures the server says 421 and closes."""
        client = make_client(memory, clock, max_failures=2, failure_delay=0)
        client.command(b"AUTH PLAIN " + b64(b"\0alice\0wrong"))
        assert [
            b"535 5.7.8 Authentication credentials invalid",
            b"421 4.7.0 mx.test Too many authentication failures, closing connection",
        ] == client.command(b"AUTH PLAIN " + b64(b"\0alice\0wrong"))
        assert client.closed

    @pytest.mark.parametrize(
        "lines, expected",
        [
            ([b"AUTH PLAIN !!!notbase64"], b"501 5.5.2 Cannot decode base64 data"),
            ([b"AUTH LOGIN", b"*"], b"501 5.0.0 Authentication cancelled"),
            ([b"AUTH GSSAPI"], b"504 5.5.4 Unrecognized authentication mechanism"),
            ([b"AUTH"], b"501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
        ],
    )
    def test_protocol_errors(self, memory, clock, lines, expected) -> None:
        """Undecodable, cancelled, unknown and empty AUTH get precise replies."""
        client = make_client(memory, clock)
        for line in lines:
            replies = client.command(line)
        assert [expected] == replies
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")

    def test_auth_twice(self, memory, clock) -> None:
        """A second AUTH after success is 503."""
        client = make_client(memory, clock)
        client.command(b"AUTH PLAIN " + b64(b"\0alice\0secret"))
        assert [b"503 5.5.1 Already authenticated"] == client.command(
            b"AUTH PLAIN " + b64(b"\0alice\0secret")
        )

    def test_auth_in_transaction(self, memory, clock) -> None:
        """AUTH during a mail transaction is 503."""
        client = make_client(memory, clock)
        client.command(b"MAIL FROM:<a@b.example>")
        assert client.command(b"AUTH PLAIN " + b64(b"\0alice\0secret"))[0].startswith(
            b"503 5.5.1"
        )


class TestGating:
    def test_hidden_without_tls(self, memory, clock, certificates) -> None:
        """By default AUTH is neither offered nor accepted before TLS."""
        tls = TLSPolicy.from_files(str(certificates["cert"]), str(certificates["key"]))
        client = make_client(memory, clock, tls=tls, allow_without_tls=False)
        assert not [x for x in client.command(b"EHLO c.example") if b"AUTH" in x]
        assert [
            b"538 5.7.11 Encryption required for requested authentication mechanism"
        ] == client.command(b"AUTH PLAIN " + b64(b"\0alice\0secret"))
        client.command(b"STARTTLS")
        assert b"250-AUTH PLAIN LOGIN CRAM-MD5" in client.command(b"EHLO c.example")

    def test_required(self, memory, clock) -> None:
        """With AUTH required, MAIL before AUTH is 530 5.7.0."""
        client = make_client(memory, clock, required=True)
        assert [b"530 5.7.0 Authentication required"] == client.command(
            b"MAIL FROM:<a@b.example>"
        )
        client.command(b"AUTH PLAIN " + b64(b"\0alice\0secret"))
        assert [b"250 2.1.0 Sender OK"] == client.command(b"MAIL FROM:<a@b.example>")

    def test_starttls_forgets_auth(self, memory, clock, certificates) -> None:
        """STARTTLS after AUTH drops the identity (RFC 3207 4.2)."""
        tls = TLSPolicy.from_files(str(certificates["cert"]), str(certificates["key"]))
        client = make_client(memory, clock, tls=tls)
        client.command(b"AUTH PLAIN " + b64(b"\0alice\0secret"))
        client.command(b"STARTTLS")
        assert client.protocol.session.auth is None


def test_debug_log_masks_credentials(memory, clock) -> None:
    """With debug on, the wire log shows AUTH lines without their payloads."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        auth = AuthPolicy.from_checkers([checker()], allow_without_tls=True)
        factory = SMTPFactory(
            memory, hostname="mx.test", reactor=clock, auth=auth, debug=True
        )
        client = connect(factory)
        client.command(b"EHLO c.example")
        client.command(b"AUTH PLAIN " + b64(b"\0alice\0secret"))
        client.command(b"AUTH LOGIN")
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = "\n".join(formatEvent(e) for e in events)
    assert "AUTH PLAIN ****" in text and "EHLO c.example" in text
    # Replies are logged too: EHLO's (built apart from the reply table) and 235.
    assert ">>> b'250-mx.test Hello c.example" in text
    assert ">>> b'235 2.7.0 Authentication successful'" in text
    for secret in (b64(b"\0alice\0secret").decode(), "secret", "alice\0"):
        assert secret not in text


@pytest_twisted.inlineCallbacks
def test_smtplib_each_mechanism(listen, memory, certificates):
    """smtplib logs in over STARTTLS with PLAIN, LOGIN and CRAM-MD5."""
    import ssl

    tls = TLSPolicy.from_files(str(certificates["cert"]), str(certificates["key"]))
    auth = AuthPolicy.from_checkers([checker()], required=True, failure_delay=0.01)
    port = listen(memory, tls=tls, auth=auth)
    context = ssl.create_default_context(cafile=str(certificates["ca"]))
    context.check_hostname = False

    def client():
        outcomes = {}
        for mechanism in ("PLAIN", "LOGIN", "CRAM-MD5"):
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.starttls(context=context)
                smtp.ehlo()
                smtp.user, smtp.password = "alice", "secret"
                method = {
                    "PLAIN": smtp.auth_plain,
                    "LOGIN": smtp.auth_login,
                    "CRAM-MD5": smtp.auth_cram_md5,
                }[mechanism]
                outcomes[mechanism] = smtp.auth(mechanism, method)[0]
                smtp.sendmail("a@b.example", ["c@d.example"], mechanism.encode())
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.starttls(context=context)
            try:
                smtp.login("alice", "wrong")
            except smtplib.SMTPAuthenticationError as error:
                outcomes["wrong"] = error.smtp_code
        return outcomes

    outcomes = yield threads.deferToThread(client)
    assert {"PLAIN": 235, "LOGIN": 235, "CRAM-MD5": 235, "wrong": 535} == outcomes
    assert ["alice"] * 3 == [e.auth for e in memory.messages]
    assert all(b"with ESMTPSA id" in e.received_header for e in memory.messages)


def test_twistd_auth_memory(tmp_path) -> None:
    """twistd --auth memory:USER:PASS --require-auth: login, send; log masked."""
    port = free_port()
    proc = start_twistd(
        tmp_path,
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        "--auth",
        "memory:alice:s3cret",
        "--auth-without-tls",
        "--require-auth",
        "--debug",
        "--maildir",
        str(tmp_path / "Maildir"),
    )
    try:
        wait_for_port(port, proc)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo()
            assert 530 == smtp.mail("a@b.example")[0]
            smtp.rset()
            smtp.user, smtp.password = "alice", "s3cret"
            assert 235 == smtp.auth("PLAIN", smtp.auth_plain)[0]
            smtp.sendmail("a@b.example", ["c@d.example"], b"Subject: a\r\n\r\nx\r\n")
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=20)
    assert "authenticated as alice" in output
    assert "s3cret" not in output
    assert b64(b"\0alice\0s3cret").decode() not in output
    assert "AUTH PLAIN ****" in output
    files = list((tmp_path / "Maildir" / "new").iterdir())
    assert 1 == len(files) and b"with ESMTPA id" in files[0].read_bytes()


def test_file_checker(tmp_path, clock) -> None:
    """A strcred file: checker (FilePasswordDB) verifies PLAIN and CRAM-MD5."""
    from twisted.cred import strcred

    from twisted_smtpd.handlers import MemoryHandler

    path = tmp_path / "passwd"
    path.write_bytes(b"bob:hunter2\n")
    file_checker = strcred.makeChecker(f"file:{path}")
    auth = AuthPolicy.from_checkers([file_checker], allow_without_tls=True)
    assert ["PLAIN", "LOGIN", "CRAM-MD5"] == auth.mechanisms
    factory = SMTPFactory(MemoryHandler(), hostname="mx.test", reactor=clock, auth=auth)
    client = connect(factory)
    client.command(b"EHLO c.example")
    assert [b"235 2.7.0 Authentication successful"] == client.command(
        b"AUTH PLAIN " + b64(b"\0bob\0hunter2")
    )
    other = connect(factory)
    other.command(b"EHLO c.example")
    challenge = b64decode(other.command(b"AUTH CRAM-MD5")[0][4:])
    digest = hmac.new(b"hunter2", challenge, "md5").hexdigest().encode()
    assert [b"235 2.7.0 Authentication successful"] == other.command(
        b64(b"bob " + digest)
    )


class TestMalformedResponses:
    @pytest.mark.parametrize(
        "lines",
        [
            [b"AUTH CRAM-MD5", b64(b"alice-without-a-digest")],
            [b"AUTH PLAIN " + b64(b"bob\0alice\0secret")],  # acting for another
        ],
    )
    def test_refused_like_bad_credentials(self, memory, clock, lines) -> None:
        """A response that names no checkable credentials is a plain 535."""
        client = make_client(memory, clock, failure_delay=0)
        for line in lines:
            replies = client.command(line)
        assert [b"535 5.7.8 Authentication credentials invalid"] == replies
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")
