"""STARTTLS, required TLS and implicit TLS: in memory and over real sockets."""

from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from twisted_smtpd import SMTPFactory
from twisted_smtpd.testing import connect
from twisted_smtpd.tls import TLSPolicy, context_from_pem

from .helpers import (
    free_port,
    require_program,
    start_twistd,
    twistd_start_error,
    wait_for_port,
)


@pytest.fixture
def tls_policy(certificates) -> TLSPolicy:
    return TLSPolicy.from_files(str(certificates["cert"]), str(certificates["key"]))


def client_context(certificates) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certificates["ca"]))
    context.check_hostname = False
    return context


class TestStartTLSInMemory:
    def _client(self, memory, tls_policy, required=False):
        policy = TLSPolicy(tls_policy.context_factory, required=required)
        factory = SMTPFactory(memory, hostname="mx.test", reactor=Clock(), tls=policy)
        client = connect(factory)
        client.replies()
        return client

    def test_advertised_until_active(self, memory, tls_policy) -> None:
        """EHLO lists STARTTLS before TLS and not after."""
        client = self._client(memory, tls_policy)
        assert b"250-STARTTLS" in client.command(b"EHLO c.example")
        assert [b"220 2.0.0 Ready to start TLS"] == client.command(b"STARTTLS")
        assert tls_policy.context_factory is client.transport.tls_context
        assert b"250-STARTTLS" not in client.command(b"EHLO c.example")

    def test_injection_discarded_and_state_forgotten(self, memory, tls_policy) -> None:
        """Plaintext pipelined after STARTTLS is dropped; HELO is forgotten."""
        client = self._client(memory, tls_policy)
        client.command(b"EHLO c.example")
        client.send(
            b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<v@y.example>\r\n"
        )
        assert [b"220 2.0.0 Ready to start TLS"] == client.replies()
        # No EHLO since TLS: no enhanced codes, and the MAIL was never run.
        assert [b"503 Send HELO/EHLO first"] == client.command(
            b"MAIL FROM:<a@b.example>"
        )
        assert [] == memory.messages

    def test_argument_and_repeat(self, memory, tls_policy) -> None:
        """STARTTLS with an argument is 501; a second STARTTLS is 503."""
        client = self._client(memory, tls_policy)
        client.command(b"EHLO c.example")
        assert [b"501 5.5.4 Syntax: STARTTLS takes no arguments"] == client.command(
            b"STARTTLS now"
        )
        client.command(b"STARTTLS")
        client.command(b"EHLO c.example")
        assert [b"503 5.5.1 TLS already active"] == client.command(b"STARTTLS")

    def test_not_configured(self, client) -> None:
        """Without a TLS policy STARTTLS is not implemented (502)."""
        client.command(b"EHLO c.example")
        assert [b"502 5.5.1 Command not implemented"] == client.command(b"STARTTLS")

    @pytest.mark.parametrize(
        "line",
        [b"MAIL FROM:<a@b.example>", b"RCPT TO:<a@b.example>", b"DATA", b"VRFY x"],
    )
    def test_required_refuses_before_tls(self, memory, tls_policy, line) -> None:
        """With TLS required, transaction commands before STARTTLS get 530 5.7.0."""
        client = self._client(memory, tls_policy, required=True)
        client.command(b"EHLO c.example")
        assert [b"530 5.7.0 Must issue a STARTTLS command first"] == client.command(
            line
        )

    def test_required_allows_basics(self, memory, tls_policy) -> None:
        """With TLS required, NOOP, RSET, EHLO and then MAIL after TLS work."""
        client = self._client(memory, tls_policy, required=True)
        assert [b"250 OK"] == client.command(b"NOOP")
        client.command(b"EHLO c.example")
        assert [b"250 2.0.0 Reset OK"] == client.command(b"RSET")
        client.command(b"STARTTLS")
        client.command(b"EHLO c.example")
        assert [b"250 2.1.0 Sender OK"] == client.command(b"MAIL FROM:<a@b.example>")


class TestContextFromFiles:
    def test_missing_file(self, tmp_path) -> None:
        """A missing certificate is a clear OSError naming the file."""
        with pytest.raises(OSError, match="cannot read TLS certificate"):
            context_from_pem(str(tmp_path / "nope.pem"), str(tmp_path / "nope.pem"))

    def test_key_is_not_a_key(self, certificates) -> None:
        """A certificate given as the key is a clear ValueError."""
        with pytest.raises(ValueError, match="no usable PEM private key"):
            context_from_pem(str(certificates["cert"]), str(certificates["cert"]))

    def test_mismatched_pair(self, certificates, tmp_path) -> None:
        """A key that does not belong to the certificate is refused."""
        from .certs import make_certificates

        other = make_certificates(tmp_path)
        with pytest.raises(ValueError, match="do not fit"):
            context_from_pem(str(certificates["cert"]), str(other["key"]))


@pytest_twisted.inlineCallbacks
def test_smtplib_starttls(listen, memory, tls_policy, certificates):
    """smtplib upgrades with STARTTLS; the envelope carries TLS facts."""
    port = listen(memory, tls=tls_policy)

    def client():
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.ehlo()
            assert smtp.has_extn("starttls")
            smtp.starttls(context=client_context(certificates))
            smtp.ehlo()
            assert not smtp.has_extn("starttls")
            smtp.sendmail("a@b.example", ["c@d.example"], b"Subject: tls\r\n\r\nx\r\n")

    yield threads.deferToThread(client)
    envelope = memory.messages[0]
    assert envelope.tls is not None and envelope.tls.protocol.startswith("TLSv1.")
    assert envelope.tls.cipher
    assert b"with ESMTPS id" in envelope.received_header
    assert b"(using TLSv1." in envelope.received_header


@pytest_twisted.inlineCallbacks
def test_implicit_tls(listen, memory, tls_policy, certificates):
    """On an ssl: listener the session is secure at once and offers no STARTTLS."""
    port = listen(memory, ssl_context=tls_policy.context_factory, tls=tls_policy)

    def client():
        with smtplib.SMTP_SSL(
            "127.0.0.1", port, context=client_context(certificates)
        ) as smtp:
            smtp.ehlo()
            extensions = set(smtp.esmtp_features)
            smtp.sendmail("a@b.example", ["c@d.example"], b"Subject: 465\r\n\r\nx\r\n")
            return extensions

    extensions = yield threads.deferToThread(client)
    assert "starttls" not in extensions
    assert "pipelining" in extensions
    assert b"with ESMTPS id" in memory.messages[0].received_header


@pytest_twisted.inlineCallbacks
def test_failed_handshake_one_log_line(listen, memory, tls_policy, certificates):
    """A client that fails the handshake costs one log line; serving goes on."""
    port = listen(memory, ssl_context=tls_policy.context_factory)
    events = []
    globalLogPublisher.addObserver(events.append)

    def client():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"EHLO this is not TLS\r\n" * 20)
            try:
                while sock.recv(4096):
                    pass
            except OSError:
                pass
        with smtplib.SMTP_SSL(
            "127.0.0.1", port, context=client_context(certificates)
        ) as smtp:
            smtp.sendmail("a@b.example", ["c@d.example"], b"after\r\n")

    try:
        yield threads.deferToThread(client)
    finally:
        globalLogPublisher.removeObserver(events.append)
    failures = [e for e in events if "TLS failed" in e.get("log_format", "")]
    assert 1 == len(failures)
    assert not [e for e in events if e.get("log_failure") is not None]
    assert [b"after\r\n"] == [e.content for e in memory.messages]


@pytest_twisted.inlineCallbacks
def test_injection_over_socket(listen, memory, tls_policy, certificates):
    """Commands sent with STARTTLS in one plaintext packet are never executed."""
    port = listen(memory, tls=tls_policy)

    def client():
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"EHLO c.example\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@x.example>\r\n")
        assert reader.readline().startswith(b"220 ")
        tls = client_context(certificates).wrap_socket(raw)
        tls_reader = tls.makefile("rb")
        tls.sendall(b"MAIL FROM:<a@b.example>\r\nQUIT\r\n")
        lines = [tls_reader.readline(), tls_reader.readline()]
        tls.close()
        return lines

    lines = yield threads.deferToThread(client)
    # The injected RSET/MAIL would have produced 250s first.
    assert [b"503 Send HELO/EHLO first\r\n", b"221 Bye\r\n"] == lines


@pytest_twisted.inlineCallbacks
def test_openssl_s_client(listen, memory, tls_policy, certificates):
    """openssl s_client -starttls smtp negotiates and sees a verified chain."""
    require_program("openssl")
    port = listen(memory, tls=tls_policy)

    def client():
        return subprocess.run(
            [
                "openssl",
                "s_client",
                "-starttls",
                "smtp",
                "-connect",
                f"127.0.0.1:{port}",
                "-CAfile",
                str(certificates["ca"]),
                "-quiet",
                "-verify_return_error",
            ],
            input=b"EHLO c.example\r\nQUIT\r\n",
            capture_output=True,
            timeout=30,
        )

    result = yield threads.deferToThread(client)
    assert 0 == result.returncode, result.stderr
    assert b"221 " in result.stdout
    assert b"250-STARTTLS" not in result.stdout


@pytest_twisted.inlineCallbacks
def test_swaks_tls(listen, memory, tls_policy):
    """swaks --tls delivers a message over STARTTLS."""
    require_program("swaks")
    port = listen(memory, tls=tls_policy)

    def client():
        return subprocess.run(
            [
                "swaks",
                "--server",
                "127.0.0.1",
                "--port",
                str(port),
                "--tls",
                "--from",
                "a@b.example",
                "--to",
                "c@d.example",
                "--body",
                "via swaks",
                "--timeout",
                "20",
            ],
            capture_output=True,
            timeout=60,
        )

    result = yield threads.deferToThread(client)
    assert 0 == result.returncode, result.stdout + result.stderr
    assert b"via swaks" in memory.messages[0].content
    assert memory.messages[0].tls is not None


def test_twistd_starttls_and_implicit_tls(tmp_path, certificates) -> None:
    """twistd serves STARTTLS on tcp: and implicit TLS on ssl: at the same time."""
    plain, secure = free_port(), free_port()
    cert, key = str(certificates["cert"]), str(certificates["key"])
    proc = start_twistd(
        tmp_path,
        "--port",
        f"tcp:{plain}:interface=127.0.0.1",
        "--port",
        f"ssl:{secure}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        "--require-tls",
        "--maildir",
        str(tmp_path / "Maildir"),
    )
    try:
        wait_for_port(plain, proc)
        wait_for_port(secure, proc)
        with smtplib.SMTP("127.0.0.1", plain, timeout=10) as smtp:
            smtp.ehlo()
            assert 530 == smtp.mail("a@b.example")[0]
            smtp.starttls(context=client_context(certificates))
            smtp.sendmail("a@b.example", ["c@d.example"], b"Subject: one\r\n\r\n1\r\n")
        with smtplib.SMTP_SSL(
            "127.0.0.1", secure, timeout=10, context=client_context(certificates)
        ) as smtp:
            smtp.ehlo()
            assert not smtp.has_extn("starttls")
            smtp.sendmail("a@b.example", ["c@d.example"], b"Subject: two\r\n\r\n2\r\n")
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=20)
    files = list((tmp_path / "Maildir" / "new").iterdir())
    assert 2 == len(files)
    assert all(b"with ESMTPS id" in f.read_bytes() for f in files)


def test_twistd_key_not_matching(tmp_path, certificates) -> None:
    """A key that does not fit the certificate ends start-up with one line."""
    from .certs import make_certificates

    other = make_certificates(tmp_path)
    status, lines = twistd_start_error(
        tmp_path,
        "--tls-cert",
        str(certificates["cert"]),
        "--tls-key",
        str(other["key"]),
    )
    assert 0 != status
    assert 1 == len(lines) and "do not fit together" in lines[0], lines


@pytest_twisted.inlineCallbacks
def test_client_certificate_in_envelope(listen, memory, certificates):
    """A verified client certificate reaches envelope.tls.peer_certificate."""
    from twisted.internet import ssl as twisted_ssl

    # Twisted's trust store still takes pyOpenSSL certificates.
    ca = twisted_ssl.Certificate.loadPEM(certificates["ca"].read_bytes()).original
    base = context_from_pem(str(certificates["cert"]), str(certificates["key"]))
    context = twisted_ssl.CertificateOptions(
        privateKey=base.privateKey,
        certificate=base.certificate,
        verify=True,
        caCerts=[ca],
        requireCertificate=False,
    )
    port = listen(memory, tls=TLSPolicy(context))

    def client():
        tls = client_context(certificates)
        # The server's own certificate doubles as a client certificate.
        tls.load_cert_chain(str(certificates["cert"]), str(certificates["key"]))
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.starttls(context=tls)
            smtp.sendmail("a@b.example", ["c@d.example"], b"with cert\r\n")

    yield threads.deferToThread(client)
    certificate = memory.messages[0].tls.peer_certificate
    assert "CN=localhost" == certificate.subject.rfc4514_string()


def alpn_client_context(certificates) -> ssl.SSLContext:
    """A client that offers ALPN, as browsers' and Go's TLS stacks do."""
    context = client_context(certificates)
    context.set_alpn_protocols(["smtp", "h2"])
    return context


def openssl_alpn(
    port: int, certificates, starttls: bool
) -> subprocess.CompletedProcess:
    """C{openssl s_client -alpn smtp}, STARTTLS or implicit TLS, then EHLO, QUIT."""
    starttls_args = ["-starttls", "smtp"] if starttls else []
    return subprocess.run(
        [
            "openssl",
            "s_client",
            *starttls_args,
            "-alpn",
            "smtp",
            "-connect",
            f"127.0.0.1:{port}",
            "-CAfile",
            str(certificates["ca"]),
            "-verify_return_error",
            "-ign_eof",
        ],
        input=b"EHLO c.example\r\nQUIT\r\n",
        capture_output=True,
        timeout=30,
    )


class TestALPN:
    """Issue 11 item 1: a ClientHello offering ALPN must not be refused."""

    @pytest_twisted.inlineCallbacks
    def test_starttls_python_alpn(self, listen, memory, tls_policy, certificates):
        """STARTTLS completes for an ALPN client; no protocol is selected."""
        port = listen(memory, tls=tls_policy)

        def client():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.starttls(context=alpn_client_context(certificates))
                selected = smtp.sock.selected_alpn_protocol()
                smtp.sendmail("a@b.example", ["c@d.example"], b"alpn\r\n")
                return selected

        assert None is (yield threads.deferToThread(client))
        assert [b"alpn\r\n"] == [e.content for e in memory.messages]

    @pytest_twisted.inlineCallbacks
    def test_implicit_python_alpn(self, listen, memory, tls_policy, certificates):
        """An ssl: listener with the policy's context accepts an ALPN client."""
        port = listen(memory, ssl_context=tls_policy.context_factory)

        def client():
            with smtplib.SMTP_SSL(
                "127.0.0.1", port, timeout=10, context=alpn_client_context(certificates)
            ) as smtp:
                smtp.sendmail("a@b.example", ["c@d.example"], b"alpn465\r\n")

        yield threads.deferToThread(client)
        assert [b"alpn465\r\n"] == [e.content for e in memory.messages]

    @pytest_twisted.inlineCallbacks
    def test_user_context_keeps_its_protocols(self, listen, memory, certificates):
        """A user's CertificateOptions with acceptableProtocols still selects one."""
        from twisted.internet import ssl as twisted_ssl

        base = context_from_pem(str(certificates["cert"]), str(certificates["key"]))
        context = twisted_ssl.CertificateOptions(
            privateKey=base.privateKey,
            certificate=base.certificate,
            extraCertChain=base.extraCertChain,
            acceptableProtocols=[b"smtp"],
        )
        port = listen(memory, tls=TLSPolicy(context))

        def client():
            selected = []
            for offer in (["h2", "smtp"], ["h2"]):
                tls = client_context(certificates)
                tls.set_alpn_protocols(offer)
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                    smtp.starttls(context=tls)
                    selected.append(smtp.sock.selected_alpn_protocol())
            return selected

        assert ["smtp", None] == (yield threads.deferToThread(client))

    def test_twistd_both_paths(self, tmp_path, certificates) -> None:
        """twistd: openssl -alpn and Python ALPN clients on STARTTLS and ssl:."""
        require_program("openssl")
        plain, secure = free_port(), free_port()
        cert, key = str(certificates["cert"]), str(certificates["key"])
        proc = start_twistd(
            tmp_path,
            "--port",
            f"tcp:{plain}:interface=127.0.0.1",
            "--port",
            f"ssl:{secure}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--handler",
            "twisted_smtpd.handlers.discard",
        )
        try:
            wait_for_port(plain, proc)
            wait_for_port(secure, proc)
            for port, starttls in ((plain, True), (secure, False)):
                result = openssl_alpn(port, certificates, starttls)
                assert 0 == result.returncode, result.stderr
                assert b"No ALPN negotiated" in result.stdout
                assert b"221 " in result.stdout
            with smtplib.SMTP("127.0.0.1", plain, timeout=10) as smtp:
                smtp.starttls(context=alpn_client_context(certificates))
                assert 250 == smtp.ehlo()[0]
            with smtplib.SMTP_SSL(
                "127.0.0.1",
                secure,
                timeout=10,
                context=alpn_client_context(certificates),
            ) as smtp:
                assert 250 == smtp.ehlo()[0]
        finally:
            proc.terminate()
            proc.communicate(timeout=20)


# Twisted's ssl: parser still hands pyOpenSSL objects to pyOpenSSL.
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
@pytest.mark.parametrize("how", ["twistd-sslmethod", "own-endpoint"])
@pytest_twisted.inlineCallbacks
def test_alpn_on_ssl_endpoints_left_to_twisted(memory, certificates, how):
    """ssl: endpoints Twisted builds (sslmethod=, or your own serverFromString
    passed through fix_ssl_endpoint) also complete an ALPN handshake."""
    from twisted.internet import endpoints, reactor

    from twisted_smtpd.tap import Options
    from twisted_smtpd.tls import ServerTLSContext, fix_ssl_endpoint

    cert, key = certificates["cert"], certificates["key"]
    description = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    if how == "twistd-sslmethod":
        options = Options()
        options.parseOptions(
            ["--handler", "twisted_smtpd.handlers.discard", "--port"]
            + [description + ":sslmethod=TLS_METHOD"]
        )
        endpoint = options["endpoints"][0]
        # Left to Twisted: its CertificateOptions, not our context.
        assert not isinstance(endpoint._sslContextFactory, ServerTLSContext)
    else:
        endpoint = fix_ssl_endpoint(endpoints.serverFromString(reactor, description))
    port = yield endpoint.listen(SMTPFactory(memory, hostname="mx.test"))

    def client():
        with smtplib.SMTP_SSL(
            "127.0.0.1",
            port.getHost().port,
            timeout=10,
            context=alpn_client_context(certificates),
        ) as smtp:
            smtp.sendmail("a@b.example", ["c@d.example"], b"alpn\r\n")

    try:
        yield threads.deferToThread(client)
    finally:
        yield port.stopListening()
    assert [b"alpn\r\n"] == [e.content for e in memory.messages]


def test_ssl_port_with_missing_key(tmp_path, certificates) -> None:
    """An ssl: port whose key file is missing stops start-up with one line."""
    missing = tmp_path / "missing.pem"
    status, lines = twistd_start_error(
        tmp_path,
        "--port",
        f"ssl:0:privateKey={missing}:certKey={certificates['cert']}",
    )
    assert 0 != status
    assert [
        f"twistd smtpd: error: bad --port 'ssl:0:privateKey={missing}:certKey="
        f"{certificates['cert']}': cannot read TLS key '{missing}':"
        " No such file or directory"
    ] == lines


def test_ssl_port_without_any_certificate(tmp_path) -> None:
    """ssl:PORT with no certificate anywhere says what it needs, in one line."""
    status, lines = twistd_start_error(tmp_path, "--port", "ssl:0")
    assert 0 != status
    assert [
        "twistd smtpd: error: bad --port 'ssl:0': ssl: needs privateKey= and"
        " certKey=, or --tls-cert and --tls-key"
    ] == lines
