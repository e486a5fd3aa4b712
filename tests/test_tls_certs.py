"""Certificates by SNI, reload on SIGHUP, encrypted keys and the TLS profile."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.internet import threads

from twisted_smtpd.tls import ServerTLSContext, TLSPolicy

from .certs import make_leaf
from .helpers import (
    free_port,
    require_program,
    start_twistd,
    twistd_start_error,
    wait_for_port,
)

PASSPHRASE = b"correct horse battery staple"


def common_name(sock: ssl.SSLSocket) -> str:
    certificate = x509.load_der_x509_certificate(sock.getpeercert(binary_form=True))
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def client_context(certificates, **settings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certificates["ca"]))
    context.check_hostname = False
    for name, value in settings.items():
        setattr(context, name, value)
    return context


def _read_reply(reader) -> bytes:
    lines = []
    while True:
        line = reader.readline()
        lines.append(line)
        if not line or line[3:4] != b"-":
            return b"".join(lines)


def starttls(port: int, context: ssl.SSLContext, server_name=None) -> ssl.SSLSocket:
    """A socket after EHLO and STARTTLS, with SNI C{server_name} if given."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = raw.makefile("rb")
    _read_reply(reader)
    raw.sendall(b"EHLO c.example\r\n")
    _read_reply(reader)
    raw.sendall(b"STARTTLS\r\n")
    assert _read_reply(reader).startswith(b"220 ")
    reader.close()  # nothing was read ahead: the server waits for the handshake
    return context.wrap_socket(raw, server_hostname=server_name)


def implicit(port: int, context: ssl.SSLContext, server_name=None, session=None):
    """A socket on an ssl: listener after the greeting."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = context.wrap_socket(raw, server_hostname=server_name, session=session)
    greeting = tls.recv(4096)
    assert greeting.startswith(b"220 "), greeting
    return tls


def command(sock: ssl.SSLSocket, line: bytes) -> bytes:
    sock.sendall(line + b"\r\n")
    with sock.makefile("rb") as reader:
        return _read_reply(reader)


@pytest.fixture
def two_names(tmp_path, certificates):
    """Pairs for localhost (the default) and other.test/*.wild.test."""
    first = make_leaf(tmp_path, certificates, ["localhost", "mx.test"], "a-")
    second = make_leaf(
        tmp_path, certificates, ["other.test", "*.wild.test"], "b-", key_type="rsa"
    )
    return [
        (str(first["cert"]), str(first["key"])),
        (str(second["cert"]), str(second["key"])),
    ]


class TestChoosingByName:
    def test_names_and_fallback(self, two_names) -> None:
        """Exact and one-label wildcard names; anything else gets the first."""
        context = ServerTLSContext(two_names)
        default, other = (i.context for i in context._identities)
        assert [
            ("localhost", "mx.test"),
            ("other.test", "*.wild.test"),
        ] == context.names
        assert other is context.context_for("OTHER.test.")
        assert other is context.context_for("a.wild.test")
        assert default is context.context_for("a.b.wild.test")
        assert default is context.context_for("wild.test")
        assert default is context.context_for("unknown.example")
        assert default is context.context_for(None)

    @pytest_twisted.inlineCallbacks
    def test_starttls_and_implicit_by_sni(
        self, listen, memory, two_names, certificates
    ):
        """Python clients get the certificate for the name they send."""
        policy = TLSPolicy.from_pairs(two_names)
        plain = listen(memory, tls=policy)
        secure = listen(memory, ssl_context=policy.context_factory)

        def client():
            seen = []
            for name in (None, "mx.test", "other.test", "x.wild.test", "nope.test"):
                with starttls(plain, client_context(certificates), name) as tls:
                    seen.append(common_name(tls))
            with implicit(secure, client_context(certificates), "other.test") as tls:
                seen.append(common_name(tls))
            return seen

        seen = yield threads.deferToThread(client)
        assert [
            "localhost",
            "localhost",
            "other.test",
            "other.test",
            "localhost",
            "other.test",
        ] == seen

    @pytest_twisted.inlineCallbacks
    def test_openssl_servername(self, listen, memory, two_names, certificates):
        """openssl s_client -servername sees, and verifies, the chosen certificate."""
        require_program("openssl")
        port = listen(memory, tls=TLSPolicy.from_pairs(two_names))

        def client(name):
            return subprocess.run(
                [
                    "openssl",
                    "s_client",
                    "-starttls",
                    "smtp",
                    "-connect",
                    f"127.0.0.1:{port}",
                    "-servername",
                    name,
                    "-verify_hostname",
                    name,
                    "-CAfile",
                    str(certificates["ca"]),
                    "-verify_return_error",
                ],
                input=b"QUIT\r\n",
                capture_output=True,
                timeout=30,
            )

        for name in ("other.test", "mx.test"):
            result = yield threads.deferToThread(client, name)
            assert 0 == result.returncode, result.stderr
            cn = "localhost" if name == "mx.test" else name
            assert f"subject=CN = {cn}".encode() in result.stdout


class TestReload:
    @pytest_twisted.inlineCallbacks
    def test_new_handshakes_see_new_files(self, tmp_path, listen, memory, certificates):
        """After reload new handshakes get the new certificate; an open
        session goes on; a bad file keeps the previous certificate."""
        live = make_leaf(tmp_path, certificates, ["localhost"], "live-")
        policy = TLSPolicy.from_files(str(live["cert"]), str(live["key"]))
        port = listen(memory, tls=policy)
        context = client_context(certificates)
        before = yield threads.deferToThread(starttls, port, context)
        assert "localhost" == common_name(before)

        make_leaf(tmp_path, certificates, ["renewed.test"], "live-")
        assert [] == (yield policy.reload())
        after = yield threads.deferToThread(starttls, port, context)
        assert "renewed.test" == common_name(after)
        after.close()
        reply = yield threads.deferToThread(command, before, b"EHLO c.example")
        assert reply.startswith(b"250-")
        before.close()

        live["cert"].write_bytes(b"-----BEGIN CERTIFICATE-----\nnot one\n")
        problems = yield policy.reload()
        assert 1 == len(problems)
        assert "kept the previous certificate" in problems[0]
        again = yield threads.deferToThread(starttls, port, context)
        assert "renewed.test" == common_name(again)
        again.close()


def _follow(proc) -> list[str]:
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _wait_for_line(lines: list[str], text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sum(text in line for line in list(lines)) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in the log: {lines!r}")


def test_twistd_sni_and_sighup(tmp_path, two_names, certificates) -> None:
    """twistd with two --tls-cert pairs: SNI on STARTTLS and on an ssl: port
    without certificate arguments; SIGHUP swaps in renewed files for new
    handshakes without dropping a session; a bad file logs one line."""
    plain, secure = free_port(), free_port()
    (cert, key), (other_cert, other_key) = two_names
    proc = start_twistd(
        tmp_path,
        "--port",
        f"tcp:{plain}:interface=127.0.0.1",
        "--port",
        f"ssl:{secure}:interface=127.0.0.1",
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        "--tls-cert",
        other_cert,
        "--tls-key",
        other_key,
        "--handler",
        "twisted_smtpd.handlers.discard",
    )
    lines = _follow(proc)
    context = client_context(certificates)
    try:
        wait_for_port(plain, proc)
        wait_for_port(secure, proc)
        with starttls(plain, context, "other.test") as tls:
            assert "other.test" == common_name(tls)
        with implicit(secure, context, "other.test") as tls:
            assert "other.test" == common_name(tls)
        session = starttls(plain, context)
        assert "localhost" == common_name(session)

        make_leaf(tmp_path, certificates, ["renewed.test"], "a-")
        proc.send_signal(signal.SIGHUP)
        _wait_for_line(lines, "TLS reloaded 2 certificate(s)")
        with starttls(plain, context) as tls:
            assert "renewed.test" == common_name(tls)
        with implicit(secure, context) as tls:
            assert "renewed.test" == common_name(tls)
        assert command(session, b"EHLO c.example").startswith(b"250-")

        (tmp_path / "a-key.pem").write_bytes(b"garbage\n")
        proc.send_signal(signal.SIGHUP)
        _wait_for_line(lines, "TLS reload:")
        with starttls(plain, context) as tls:
            assert "renewed.test" == common_name(tls)
        assert command(session, b"QUIT").startswith(b"221 ")
        session.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        proc.stdout.close()
    problems = [line for line in lines if "TLS reload:" in line]
    assert 1 == len(problems), lines
    assert "kept the previous certificate for" in problems[0]
    assert not [line for line in lines if "Traceback" in line], lines


class TestEncryptedKeys:
    @pytest.mark.parametrize("legacy", [False, True], ids=["pkcs8", "proc-type"])
    @pytest_twisted.inlineCallbacks
    def test_passphrase(self, tmp_path, listen, memory, certificates, legacy):
        """Encrypted PKCS#8 and legacy Proc-Type/DEK-Info keys load and serve."""
        paths = make_leaf(
            tmp_path,
            certificates,
            ["localhost"],
            passphrase=PASSPHRASE,
            legacy_key=legacy,
        )
        text = paths["key"].read_text()
        if legacy:
            assert "Proc-Type: 4,ENCRYPTED" in text and "DEK-Info: " in text
        else:
            assert "BEGIN ENCRYPTED PRIVATE KEY" in text
        policy = TLSPolicy.from_files(
            str(paths["cert"]), str(paths["key"]), passphrase=PASSPHRASE.decode()
        )
        port = listen(memory, tls=policy)
        tls = yield threads.deferToThread(starttls, port, client_context(certificates))
        assert "localhost" == common_name(tls)
        tls.close()

    @pytest.mark.parametrize("legacy", [False, True], ids=["pkcs8", "proc-type"])
    def test_wrong_or_missing(self, tmp_path, certificates, legacy) -> None:
        """A wrong passphrase, or none, is a ValueError naming the key."""
        paths = make_leaf(
            tmp_path,
            certificates,
            ["localhost"],
            passphrase=PASSPHRASE,
            legacy_key=legacy,
        )
        cert, key = str(paths["cert"]), str(paths["key"])
        with pytest.raises(ValueError, match="^wrong passphrase for TLS key '"):
            TLSPolicy.from_files(cert, key, passphrase=b"wrong")
        with pytest.raises(ValueError, match="is encrypted and no passphrase"):
            TLSPolicy.from_files(cert, key)

    def test_wrong_passphrase_that_decrypts_to_garbage(
        self, tmp_path, certificates, monkeypatch
    ) -> None:
        """A wrong passphrase whose decryption happens to unpad cleanly (the
        DER parse fails instead: about 1 in 300 salts) is still named a wrong
        passphrase, not an unusable key."""
        from cryptography.hazmat.primitives import serialization

        paths = make_leaf(tmp_path, certificates, ["localhost"], passphrase=PASSPHRASE)

        def garbage(data: bytes, password: object = None, **kw: object) -> None:
            raise ValueError("Could not deserialize key data. The data may be in an")

        monkeypatch.setattr(serialization, "load_pem_private_key", garbage)
        with pytest.raises(ValueError, match="^wrong passphrase for TLS key '"):
            TLSPolicy.from_files(
                str(paths["cert"]), str(paths["key"]), passphrase=b"wrong"
            )

    def test_plain_key_ignores_passphrase(self, certificates) -> None:
        """One passphrase for all keys: an unencrypted one still loads."""
        TLSPolicy.from_files(
            str(certificates["cert"]), str(certificates["key"]), passphrase="x"
        )

    @pytest.mark.parametrize(
        ("content", "error"),
        [
            (None, "cannot read TLS key passphrase file '{path}': No such file"),
            (b"\n", "TLS key passphrase file '{path}' is empty"),
        ],
    )
    def test_bad_passphrase_file(self, tmp_path, certificates, capsys, content, error):
        """A missing or empty passphrase file is refused in one line."""
        from twisted_smtpd.tap import Options

        path = tmp_path / "pass"
        if content is not None:
            path.write_bytes(content)
        argv = ["--tls-cert", str(certificates["cert"]), "--tls-key"]
        argv += [str(certificates["key"]), "--tls-key-passphrase-file", str(path)]
        with pytest.raises(SystemExit):
            Options().parseOptions(argv)
        lines = capsys.readouterr().err.splitlines()
        assert 1 == len(lines)
        assert lines[0].startswith("twistd smtpd: error: " + error.format(path=path))

    def test_twistd_passphrase_file(self, tmp_path, certificates) -> None:
        """--tls-key-passphrase-file opens keys for STARTTLS and ssl:; a wrong
        one stops start-up with one line."""
        paths = make_leaf(
            tmp_path,
            certificates,
            ["localhost"],
            passphrase=PASSPHRASE,
            legacy_key=True,
        )
        good, bad = tmp_path / "pass", tmp_path / "wrong"
        good.write_bytes(PASSPHRASE + b"\n")
        bad.write_bytes(b"wrong\n")
        cert, key = str(paths["cert"]), str(paths["key"])
        status, lines = twistd_start_error(
            tmp_path,
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--tls-key-passphrase-file",
            str(bad),
        )
        assert 0 != status
        assert [f"twistd smtpd: error: wrong passphrase for TLS key {key!r}"] == lines
        status, lines = twistd_start_error(
            tmp_path, "--tls-cert", cert, "--tls-key", key
        )
        assert 0 != status and 1 == len(lines), lines
        assert "is encrypted and no passphrase was given" in lines[0]

        plain, secure = free_port(), free_port()
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
            "--tls-key-passphrase-file",
            str(good),
            "--handler",
            "twisted_smtpd.handlers.discard",
        )
        try:
            wait_for_port(plain, proc)
            wait_for_port(secure, proc)
            context = client_context(certificates)
            with starttls(plain, context) as tls:
                assert "localhost" == common_name(tls)
            with implicit(secure, context) as tls:
                assert "localhost" == common_name(tls)
        finally:
            proc.terminate()
            proc.communicate(timeout=20)


def _openssl_implicit(port: int, certificates, *args: str):
    return subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-CAfile",
            str(certificates["ca"]),
            "-ign_eof",
            *args,
        ],
        input=b"QUIT\r\n",
        capture_output=True,
        timeout=30,
    )


class TestProfile:
    """Mozilla intermediate: TLS 1.2+, AEAD with ECDHE only, resumption."""

    @pytest.fixture
    def rsa_pair(self, tmp_path, certificates):
        # An RSA certificate: with it static-RSA suites would be possible.
        paths = make_leaf(tmp_path, certificates, ["localhost"], key_type="rsa")
        return str(paths["cert"]), str(paths["key"])

    @pytest.mark.parametrize(
        ("args", "accepted"),
        [
            (("-tls1_3",), True),
            (("-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"), True),
            (("-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305"), True),
            (("-tls1_2", "-cipher", "DHE-RSA-AES256-GCM-SHA384"), True),
            (("-tls1_2", "-cipher", "DHE-RSA-AES128-SHA"), False),
            (("-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256"), False),
            (("-tls1_2", "-cipher", "ECDHE-RSA-AES256-SHA"), False),
            (("-tls1_2", "-cipher", "AES128-GCM-SHA256"), False),
            (("-tls1_2", "-cipher", "AES256-SHA256"), False),
            (("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"), False),
            (("-tls1", "-cipher", "DEFAULT@SECLEVEL=0"), False),
        ],
    )
    @pytest_twisted.inlineCallbacks
    def test_openssl_offers(
        self, listen, memory, rsa_pair, certificates, args, accepted
    ):
        """CBC, static RSA and TLS < 1.2 are refused; the profile's suites work."""
        require_program("openssl")
        port = listen(memory, ssl_context=ServerTLSContext([rsa_pair]))
        result = yield threads.deferToThread(
            _openssl_implicit, port, certificates, *args
        )
        completed = b"221 " in result.stdout
        assert accepted is completed, (result.stdout, result.stderr)
        if accepted and args[-1].startswith("DHE-"):
            assert b"Server Temp Key: DH, 2048 bits" in result.stdout

    @pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
    @pytest_twisted.inlineCallbacks
    def test_session_resumption(self, listen, memory, rsa_pair, certificates, version):
        """A second connection resumes the first one's session (tickets)."""
        port = listen(memory, ssl_context=ServerTLSContext([rsa_pair]))
        tls_version = getattr(ssl.TLSVersion, version)
        context = client_context(
            certificates, minimum_version=tls_version, maximum_version=tls_version
        )

        def client():
            with implicit(port, context) as first:
                command(first, b"NOOP")
                session, first_reused = first.session, first.session_reused
            with implicit(port, context, session=session) as second:
                reused = second.session_reused, second.version()
            return first_reused, session.has_ticket, reused

        first_reused, has_ticket, reused = yield threads.deferToThread(client)
        assert (False, True) == (first_reused, has_ticket)
        assert (True, version.replace("_", ".")) == reused


def test_twistd_workers_reload_on_sighup(tmp_path, certificates) -> None:
    """With --workers the parent relays SIGHUP: every process reloads."""
    live = make_leaf(tmp_path, certificates, ["localhost"], "live-")
    port = free_port()
    proc = start_twistd(
        tmp_path,
        "--port",
        f"tcp:{port}:interface=127.0.0.1",
        "--workers",
        "2",
        "--tls-cert",
        str(live["cert"]),
        "--tls-key",
        str(live["key"]),
        "--handler",
        "twisted_smtpd.handlers.discard",
    )
    lines = _follow(proc)
    context = client_context(certificates)
    try:
        wait_for_port(port, proc)
        _wait_for_line(lines, "smtpd worker 1 serving")
        time.sleep(0.5)  # the worker's reactor installs its signal handlers
        make_leaf(tmp_path, certificates, ["renewed.test"], "live-")
        proc.send_signal(signal.SIGHUP)
        _wait_for_line(lines, "TLS reloaded 1 certificate(s)", count=2)
        sockets = [starttls(port, context) for _ in range(12)]
        assert {"renewed.test"} == {common_name(tls) for tls in sockets}
        for tls in sockets:
            tls.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()


def test_sighup_still_reloads_while_draining(tmp_path, certificates, monkeypatch):
    """A drain (SIGUSR1) keeps the process up; SIGHUP must not become fatal."""
    import twisted.internet
    from twisted.internet.testing import MemoryReactorClock

    from twisted_smtpd.tap import Options, TLSReloadService, makeService

    monkeypatch.setattr(twisted.internet, "reactor", MemoryReactorClock())
    options = Options()
    options.parseOptions(
        ["--handler", "twisted_smtpd.handlers.discard", "--port", "tcp:2525"]
        + ["--tls-cert", str(certificates["cert"]), "--tls-key"]
        + [str(certificates["key"])]
    )
    previous = signal.getsignal(signal.SIGHUP)
    parent = makeService(options)
    (reloader,) = [c for c in parent if isinstance(c, TLSReloadService)]
    parent.privilegedStartService()
    parent.startService()
    try:
        assert previous is not signal.getsignal(signal.SIGHUP)
        parent.drain()
        assert reloader.running
        assert previous is not signal.getsignal(signal.SIGHUP)
    finally:
        parent.stopService()
    assert not reloader.running
    assert previous is signal.getsignal(signal.SIGHUP)
