"""C{twistd smtpd}: option parsing, the service tree and the dropin."""

from __future__ import annotations

import importlib.util
import os
import smtplib
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import twisted.internet
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, IServiceMaker, MultiService, Service
from twisted.cred.credentials import UsernamePassword
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin, getPlugins
from twisted.python import usage

from twisted_smtpd import Limits, SMTPFactory, tap
from twisted_smtpd.auth import AuthPolicy, IAuthenticatedSender
from twisted_smtpd.handlers import MaildirHandler, MemoryHandler, discard
from twisted_smtpd.tap import (
    Options,
    SMTPService,
    build_factory,
    listen_backlog,
    makeService,
)
from twisted_smtpd.testing import connect
from twisted_smtpd.tls import ServerTLSContext, TLSPolicy
from twisted_smtpd.workers import WorkerPool

from .helpers import twistd_command, twistd_env, twistd_start_error, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
DISCARD = ("--handler", "twisted_smtpd.handlers.discard")


def parse(*args: str) -> Options:
    """Options parsed from C{args}, as twistd would."""
    options = Options()
    options.parseOptions(list(args))
    return options


def parse_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one line C{args} are refused with; fails unless they are refused."""
    with pytest.raises(SystemExit) as raised:
        parse(*args)
    assert 1 == raised.value.code
    captured = capsys.readouterr()
    assert "" == captured.out
    return captured.err


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty directory, so the default ./Maildir lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def memory_reactor(monkeypatch: pytest.MonkeyPatch) -> MemoryReactorClock:
    """The global reactor, as tap.py sees it, is a MemoryReactor."""
    reactor = MemoryReactorClock()
    monkeypatch.setattr(twisted.internet, "reactor", reactor)
    return reactor


class TestDefaults:
    def test_defaults(self, cwd: Path) -> None:
        """Without options: tcp:2525, ./Maildir, default limits, no TLS, no AUTH."""
        options = parse()
        assert ["tcp:2525:interface=127.0.0.1"] == options["ports"]
        (endpoint,) = options["endpoints"]
        assert isinstance(endpoint, endpoints.TCP4ServerEndpoint)
        assert (2525, "127.0.0.1") == (endpoint._port, endpoint._interface)
        assert True is options["default_port"]
        assert Limits() == options["limits"]
        assert (30, 1) == (options["grace"], options["worker_count"])
        assert (None, None) == (options["tls_policy"], options["auth_policy"])
        assert (0, 0) == (options["debug"], options["quiet"])
        assert [] == options["argv"]
        handler = options["handler_object"]
        assert isinstance(handler, MaildirHandler)
        assert str(cwd / "Maildir") == handler.path
        assert ["cur", "new", "tmp"] == sorted(
            p.name for p in (cwd / "Maildir").iterdir()
        )

    def test_maildir_option(self, cwd: Path) -> None:
        """--maildir picks the Maildir, created on the spot."""
        options = parse("--maildir", "mail/box")
        assert str(cwd / "mail" / "box") == options["handler_object"].path
        assert (cwd / "mail" / "box" / "new").is_dir()
        assert not (cwd / "Maildir").exists()

    def test_argv_kept_for_workers(self, cwd: Path) -> None:
        """The options as given are kept for the worker processes."""
        args = [*DISCARD, "--port", "tcp:2526", "--quiet"]
        assert args == parse(*args)["argv"]

    def test_maildir_not_usable(
        self, cwd: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A --maildir that cannot be created is a one-line error."""
        (cwd / "plain").write_text("")
        assert (
            "twistd smtpd: error: cannot use --maildir 'plain': Not a directory\n"
            == parse_error(capsys, "--maildir", "plain")
        )


class TestPorts:
    def test_repeatable(self, cwd: Path) -> None:
        """--port and -p add listeners, in order; the default is then unused."""
        options = parse(*DISCARD, "--port", "tcp:2526", "-p", "tcp6:2527")
        assert ["tcp:2526", "tcp6:2527"] == options["ports"]
        first, second = options["endpoints"]
        assert isinstance(first, endpoints.TCP4ServerEndpoint)
        assert isinstance(second, endpoints.TCP6ServerEndpoint)
        assert (2526, 2527) == (first._port, second._port)

    def test_bad_port(self, cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An endpoint description that does not parse is a one-line error."""
        error = parse_error(capsys, *DISCARD, "--port", "nonsense:25")
        assert error.startswith("twistd smtpd: error: bad --port 'nonsense:25': ")
        assert 1 == error.count("\n")
        assert error.endswith("\n")


class TestHandler:
    def test_discard(self, cwd: Path) -> None:
        """--handler twisted_smtpd.handlers.discard uses that object; no Maildir."""
        options = parse(*DISCARD)
        assert discard is options["handler_object"]
        assert [] == list(cwd.iterdir())

    def test_class_is_instantiated(self, cwd: Path) -> None:
        """A handler class named with --handler is instantiated once."""
        handler = parse("--handler", "twisted_smtpd.handlers.MemoryHandler")[
            "handler_object"
        ]
        assert MemoryHandler is type(handler)

    def test_unknown_name(self, cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A --handler that cannot be imported is a one-line error."""
        error = parse_error(capsys, "--handler", "no_such_module.handler")
        assert error.startswith(
            "twistd smtpd: error: cannot load --handler 'no_such_module.handler': "
        )
        assert 1 == error.count("\n")

    def test_not_a_handler(self, cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An object with no handler hooks is refused by name."""
        error = parse_error(capsys, "--handler", "os.sep")
        assert error.startswith("twistd smtpd: error: --handler 'os.sep': ")
        assert "neither callable nor has handle_message/open_message" in error


class TestLimits:
    def test_numbers(self, cwd: Path) -> None:
        """The numeric options end up in Limits, the grace and the worker count."""
        options = parse(
            *DISCARD,
            "--max-message-size",
            "1000",
            "--max-recipients",
            "5",
            "--timeout",
            "60",
            "--max-connections",
            "10",
            "--max-connections-per-ip",
            "2",
            "--tls-handshake-timeout",
            "20",
            "--max-session-time",
            "900",
            "--shutdown-grace",
            "7",
            "--workers",
            "3",
        )
        assert (
            Limits(
                max_message_size=1000,
                max_recipients=5,
                timeout=60,
                tls_handshake_timeout=20,
                max_session_time=900,
                max_connections=10,
                max_connections_per_ip=2,
            )
            == options["limits"]
        )
        assert (7, 3) == (options["grace"], options["worker_count"])

    def test_zero_means_unlimited(self, cwd: Path) -> None:
        """Zero is accepted where it means no limit, and for the grace period."""
        options = parse(
            *DISCARD,
            "--max-message-size",
            "0",
            "--max-connections",
            "0",
            "--shutdown-grace",
            "0",
        )
        assert (0, 0, 0) == (
            options["limits"].max_message_size,
            options["limits"].max_connections,
            options["grace"],
        )

    @pytest.mark.parametrize(
        "option, value, message",
        [
            (
                "--max-message-size",
                "-1",
                "--max-message-size must be at least 0, not -1",
            ),
            ("--max-recipients", "0", "--max-recipients must be at least 1, not 0"),
            ("--timeout", "soon", "--timeout must be a whole number, not 'soon'"),
            ("--timeout", "0", "--timeout must be at least 1, not 0"),
            (
                "--tls-handshake-timeout",
                "0",
                "--tls-handshake-timeout must be at least 1, not 0",
            ),
            (
                "--max-session-time",
                "-1",
                "--max-session-time must be at least 0, not -1",
            ),
            (
                "--max-connections",
                "1.5",
                "--max-connections must be a whole number, not '1.5'",
            ),
            (
                "--max-connections-per-ip",
                "-3",
                "--max-connections-per-ip must be at least 0, not -3",
            ),
            ("--shutdown-grace", "-1", "--shutdown-grace must be at least 0, not -1"),
            ("--workers", "0", "--workers must be at least 1, not 0"),
        ],
    )
    def test_bad_numbers(
        self,
        cwd: Path,
        capsys: pytest.CaptureFixture[str],
        option: str,
        value: str,
        message: str,
    ) -> None:
        """A bad number is one line on stderr and exit status 1."""
        assert f"twistd smtpd: error: {message}\n" == parse_error(
            capsys, *DISCARD, option, value
        )

    def test_unknown_option(
        self, cwd: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An unknown option is one line too, not the whole help text."""
        assert "twistd smtpd: error: option --frobnicate not recognized\n" == (
            parse_error(capsys, "--frobnicate")
        )


class TestFactory:
    def test_flags_reach_the_factory(self, cwd: Path) -> None:
        """--quiet, --debug, --hostname and the limits reach the SMTPFactory."""
        options = parse(*DISCARD, "--quiet", "--debug", "--hostname", "mx.test")
        factory = build_factory(options)
        assert (True, True) == (factory.quiet, factory.debug)
        assert "mx.test" == factory.hostname
        assert discard is factory.handler
        assert options["limits"] is factory.limits

    def test_quiet_and_debug_default_off(self, cwd: Path) -> None:
        """Without the flags the factory logs sessions and no dialogue."""
        factory = build_factory(parse(*DISCARD, "--hostname", "mx.test"))
        assert (False, False) == (factory.quiet, factory.debug)
        assert (None, None) == (factory.tls, factory.auth)


class TestAuth:
    def test_memory_checker(self, cwd: Path) -> None:
        """--auth memory:alice:secret builds an AuthPolicy offering CRAM-MD5 too."""
        policy = parse(*DISCARD, "--auth", "memory:alice:secret")["auth_policy"]
        assert isinstance(policy, AuthPolicy)
        assert ["PLAIN", "LOGIN", "CRAM-MD5"] == policy.mechanisms
        assert (False, False) == (policy.required, policy.allow_without_tls)
        logins: list[Any] = []
        credentials = UsernamePassword(b"alice", b"secret")
        policy.portal.login(credentials, None, IAuthenticatedSender).addBoth(
            logins.append
        )
        assert (IAuthenticatedSender, "alice") == logins[0][:2]

    def test_required_and_without_tls(self, cwd: Path) -> None:
        """--require-auth and --auth-without-tls set the policy's flags."""
        policy = parse(
            *DISCARD,
            "--auth",
            "memory:alice:secret",
            "--require-auth",
            "--auth-without-tls",
        )["auth_policy"]
        assert (True, True) == (policy.required, policy.allow_without_tls)

    def test_advertised_and_usable(self, cwd: Path) -> None:
        """The factory built from --auth offers AUTH and accepts the user."""
        options = parse(
            *DISCARD,
            "--hostname",
            "mx.test",
            "--auth",
            "memory:alice:secret",
            "--auth-without-tls",
        )
        client = connect(build_factory(options))
        client.replies()
        assert b"250-AUTH PLAIN LOGIN CRAM-MD5" in client.command(b"EHLO c.example")
        # base64 of "\0alice\0secret"
        assert [b"235 2.7.0 Authentication successful"] == client.command(
            b"AUTH PLAIN AGFsaWNlAHNlY3JldA=="
        )

    def test_require_auth_needs_a_checker(
        self, cwd: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--require-auth without --auth is an error."""
        assert (
            "twistd smtpd: error: --require-auth needs at least one --auth checker\n"
            == parse_error(capsys, *DISCARD, "--require-auth")
        )

    def test_unsupported_checker(
        self, cwd: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A checker SASL cannot use (anonymous) is refused in one line."""
        error = parse_error(capsys, *DISCARD, "--auth", "anonymous")
        assert error.startswith("twistd smtpd: error: Auth plugin not supported: ")
        assert 1 == error.count("\n")


class TestTLS:
    def test_cert_and_key(self, cwd: Path, certificates: dict[str, Path]) -> None:
        """--tls-cert and --tls-key build a TLSPolicy; STARTTLS is offered."""
        options = parse(
            *DISCARD,
            "--hostname",
            "mx.test",
            "--tls-cert",
            str(certificates["cert"]),
            "--tls-key",
            str(certificates["key"]),
        )
        policy = options["tls_policy"]
        assert isinstance(policy, TLSPolicy)
        assert isinstance(policy.context_factory, ServerTLSContext)
        assert False is bool(policy.required)
        client = connect(build_factory(options))
        client.replies()
        assert b"250-STARTTLS" in client.command(b"EHLO c.example")

    def test_require_tls(self, cwd: Path, certificates: dict[str, Path]) -> None:
        """--require-tls with a certificate makes the policy required."""
        policy = parse(
            *DISCARD,
            "--tls-cert",
            str(certificates["cert"]),
            "--tls-key",
            str(certificates["key"]),
            "--require-tls",
        )["tls_policy"]
        assert True is bool(policy.required)

    def test_require_tls_needs_a_certificate(
        self, cwd: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--require-tls without a certificate is an error."""
        assert (
            "twistd smtpd: error: --require-tls needs --tls-cert and --tls-key\n"
            == parse_error(capsys, *DISCARD, "--require-tls")
        )

    def test_cert_without_key(
        self,
        cwd: Path,
        capsys: pytest.CaptureFixture[str],
        certificates: dict[str, Path],
    ) -> None:
        """--tls-cert alone is an error."""
        assert (
            "twistd smtpd: error: --tls-cert and --tls-key go together\n"
            == parse_error(capsys, *DISCARD, "--tls-cert", str(certificates["cert"]))
        )

    def test_unreadable_key(
        self,
        cwd: Path,
        capsys: pytest.CaptureFixture[str],
        certificates: dict[str, Path],
    ) -> None:
        """A key file that cannot be read is named in a one-line error."""
        error = parse_error(
            capsys,
            *DISCARD,
            "--tls-cert",
            str(certificates["cert"]),
            "--tls-key",
            "missing.pem",
        )
        assert error.startswith("twistd smtpd: error: ")
        assert "cannot read TLS key 'missing.pem': No such file or directory" in error
        assert 1 == error.count("\n")

    def test_unreadable_key_message(
        self,
        cwd: Path,
        capsys: pytest.CaptureFixture[str],
        certificates: dict[str, Path],
    ) -> None:
        """The error for an unreadable key is the plain message, no errno."""
        assert (
            "twistd smtpd: error: cannot read TLS key 'missing.pem':"
            " No such file or directory\n"
        ) == parse_error(
            capsys,
            *DISCARD,
            "--tls-cert",
            str(certificates["cert"]),
            "--tls-key",
            "missing.pem",
        )

    def test_key_of_another_certificate(
        self,
        cwd: Path,
        capsys: pytest.CaptureFixture[str],
        certificates: dict[str, Path],
    ) -> None:
        """A certificate and key that do not belong together are refused."""
        error = parse_error(
            capsys,
            *DISCARD,
            "--tls-cert",
            str(certificates["ca"]),
            "--tls-key",
            str(certificates["key"]),
        )
        assert error.startswith("twistd smtpd: error: TLS certificate ")
        assert error.endswith(" do not fit together\n")


class TestWorkers:
    def test_shareable_ports(self, cwd: Path) -> None:
        """--workers accepts tcp: and tcp6: ports."""
        options = parse(*DISCARD, "--workers", "2", "-p", "tcp:2526", "-p", "tcp6:2527")
        assert 2 == options["worker_count"]

    def test_unix_port_refused(
        self, cwd: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--workers with a unix: port is an error naming the port."""
        assert (
            "twistd smtpd: error: --workers can share tcp: and ssl: ports,"
            " not 'unix:smtpd.sock'\n"
            == parse_error(
                capsys,
                *DISCARD,
                "--workers",
                "2",
                "-p",
                "tcp:2526",
                "-p",
                "unix:smtpd.sock",
            )
        )

    def test_one_worker_may_use_unix(self, cwd: Path) -> None:
        """Without extra workers a unix: port is fine."""
        options = parse(*DISCARD, "-p", "unix:smtpd.sock")
        assert isinstance(options["endpoints"][0], endpoints.UNIXServerEndpoint)


class TestMakeService:
    def test_one_listener_per_port_one_factory(
        self, cwd: Path, memory_reactor: MemoryReactorClock
    ) -> None:
        """Each --port gets a listener service; all share one factory."""
        options = parse(
            *DISCARD, "--hostname", "mx.test", "-p", "tcp:2526", "-p", "tcp:2527"
        )
        parent = makeService(options)
        assert isinstance(parent, SMTPService)
        assert isinstance(parent, MultiService)
        assert IService.providedBy(parent)
        children = list(parent)
        assert 2 == len(children)
        assert all(isinstance(c, StreamServerEndpointService) for c in children)
        assert options["endpoints"] == [c.endpoint for c in children]
        assert [parent.factory] * 2 == [c.factory for c in children]
        assert discard is parent.factory.handler
        assert 30 == parent.grace
        assert [True, True] == [c._raiseSynchronously for c in children]

    def test_workers(self, cwd: Path, memory_reactor: MemoryReactorClock) -> None:
        """--workers 3 adds a WorkerPool of 2 over the same listeners."""
        args = [
            *DISCARD,
            "--hostname",
            "mx.test",
            "--workers",
            "3",
            "--shutdown-grace",
            "9",
        ]
        args += ["-p", "tcp:2526", "-p", "tcp:2527"]
        parent = makeService(parse(*args))
        *listeners, pool = list(parent)
        assert isinstance(pool, WorkerPool)
        assert (2, 9, args) == (pool.count, pool.grace, pool.argv)
        assert listeners == pool.listeners
        assert 2 == len(listeners)

    def test_no_workers_by_default(
        self, cwd: Path, memory_reactor: MemoryReactorClock
    ) -> None:
        """Without --workers there is no WorkerPool."""
        parent = makeService(parse(*DISCARD, "--hostname", "mx.test"))
        assert [] == [c for c in parent if isinstance(c, WorkerPool)]

    def test_start_and_stop(
        self, cwd: Path, memory_reactor: MemoryReactorClock
    ) -> None:
        """Starting listens on every port with the factory; stopping shuts it down."""
        options = parse(
            *DISCARD,
            "--hostname",
            "mx.test",
            "--shutdown-grace",
            "5",
            "-p",
            "tcp:2526:interface=127.0.0.1",
            "-p",
            "tcp:2527:backlog=77",
        )
        parent = makeService(options)
        factory = parent.factory
        assert memory_reactor is factory.reactor
        parent.privilegedStartService()
        parent.startService()
        # Our default backlog unless the endpoint string gives one.
        assert [
            (2526, factory, listen_backlog(), "127.0.0.1"),
            (2527, factory, 77, ""),
        ] == memory_reactor.tcpServers
        stopped: list[Any] = []
        parent.stopService().addBoth(stopped.append)
        assert [None] == stopped
        assert (True, False) == (factory.shutting_down, parent.running)

    def test_stop_drains_open_sessions(
        self, cwd: Path, memory_reactor: MemoryReactorClock
    ) -> None:
        """Stopping tells open sessions 421 and waits for them to close."""
        parent = makeService(parse(*DISCARD, "--hostname", "mx.test"))
        parent.privilegedStartService()
        parent.startService()
        client = connect(parent.factory)
        client.replies()
        stopped: list[Any] = []
        parent.stopService().addBoth(stopped.append)
        assert [
            b"421 mx.test Service shutting down, closing connection"
        ] == client.replies()
        assert [] == stopped
        client.protocol.connectionLost(None)
        assert [None] == stopped

    def test_cannot_listen(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A port that cannot be bound is one line on stderr and exit status 1."""

        class Taken:
            def listen(self, factory: Any) -> Deferred[Any]:
                error = OSError(98, "Address already in use")
                return fail(CannotListenError("127.0.0.1", 25, error))

        parent = SMTPService(FakeFactory())
        listener = StreamServerEndpointService(Taken(), None)
        listener._raiseSynchronously = True
        listener.setServiceParent(parent)
        with pytest.raises(SystemExit) as raised:
            parent.privilegedStartService()
        assert 1 == raised.value.code
        assert (
            "twistd smtpd: error: cannot listen on 127.0.0.1:25:"
            " Address already in use\n"
        ) == capsys.readouterr().err


class FakeFactory:
    """Records shutdown(grace) and answers with a Deferred the test controls."""

    def __init__(self) -> None:
        self.shutdowns: list[float] = []
        self.drained: Deferred[None] = Deferred()

    def shutdown(self, grace: float) -> Deferred[None]:
        self.shutdowns.append(grace)
        return self.drained


class SlowListener(Service):
    """A child service whose stop finishes when the test says so."""

    def __init__(self) -> None:
        self.stopping: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.stopping


class TestSMTPServiceStop:
    def test_shutdown_after_the_listeners_stop(self) -> None:
        """factory.shutdown(grace) runs once every listener has stopped."""
        factory = FakeFactory()
        parent = SMTPService(factory, grace=12)
        first, second = SlowListener(), SlowListener()
        first.setServiceParent(parent)
        second.setServiceParent(parent)
        parent.startService()
        stopped: list[Any] = []
        parent.stopService().addBoth(stopped.append)
        assert [] == factory.shutdowns
        first.stopping.callback(None)
        assert [] == factory.shutdowns
        second.stopping.callback(None)
        assert [12] == factory.shutdowns
        assert [] == stopped  # the sessions are still draining
        factory.drained.callback(None)
        assert [None] == stopped

    def test_default_grace(self) -> None:
        """Without a grace the factory gets 30 seconds."""
        factory = FakeFactory()
        factory.drained = succeed(None)
        SMTPService(factory).stopService()
        assert [30.0] == factory.shutdowns


class TestDropin:
    def test_found_by_twistd(self) -> None:
        """getPlugins(IServiceMaker) offers smtpd, backed by twisted_smtpd.tap."""
        found = [p for p in getPlugins(IServiceMaker) if p.tapname == "smtpd"]
        assert ["twisted_smtpd.tap"] == [p.module for p in found]
        assert (Options, makeService) == (found[0].options, found[0].makeService)

    def test_dropin_file_in_this_tree(self) -> None:
        """twisted/plugins/smtpd_plugin.py of this tree describes the smtpd tap."""
        path = ROOT / "twisted" / "plugins" / "smtpd_plugin.py"
        spec = importlib.util.spec_from_file_location("smtpd_plugin_under_test", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        maker = module.smtpd
        assert IPlugin.providedBy(maker) and IServiceMaker.providedBy(maker)
        assert ("smtpd", "twisted_smtpd.tap") == (maker.tapname, maker.module)
        assert tap.Options is maker.options


def test_hostname_default_is_the_fqdn(
    cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --hostname the factory uses the machine's FQDN."""
    monkeypatch.setattr(socket, "getfqdn", lambda *a: "host.example.org")
    factory = build_factory(parse(*DISCARD))
    assert "host.example.org" == factory.hostname


def test_deliver_unknown_scheme_stops_startup(tmp_path):
    """--deliver with a scheme nobody serves stops twistd with one line."""
    from tests.helpers import twistd_start_error

    status, lines = twistd_start_error(tmp_path, "--deliver", "gopher://x")
    assert status != 0
    assert any("unknown --deliver scheme 'gopher'" in line for line in lines), lines


@pytest.fixture
def logged() -> Any:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def log_lines(events: list[dict[str, Any]], text: str) -> list[str]:
    from twisted.logger import formatEvent

    return [line for line in map(formatEvent, events) if text in line]


class TestSafeDefaults:
    def test_default_listens_on_loopback_and_says_so(
        self,
        cwd: Path,
        memory_reactor: MemoryReactorClock,
        logged: list[dict[str, Any]],
    ) -> None:
        """No --port: 127.0.0.1:2525 only, and a warning says how to open it.

        Before: tcp:2525 on every interface, with a handler that accepts
        every recipient.
        """
        parent = makeService(parse(*DISCARD))
        parent.privilegedStartService()
        parent.startService()
        assert [(2525, "127.0.0.1")] == [
            (port, interface) for port, _, _, interface in memory_reactor.tcpServers
        ]
        (line,) = log_lines(logged, "listening on")
        # (A MemoryReactor's port says 0.0.0.0; twistd runs show the address.)
        assert line.startswith("smtpd: listening on ") and " only (the default)" in line
        assert "--port tcp:2525 (every interface)" in line
        parent.stopService()

    def test_a_given_port_is_reported(
        self,
        cwd: Path,
        memory_reactor: MemoryReactorClock,
        logged: list[dict[str, Any]],
    ) -> None:
        parent = makeService(parse(*DISCARD, "-p", "tcp:2526", "-p", "tcp6:2527"))
        parent.privilegedStartService()
        assert [
            "smtpd: listening on 0.0.0.0:2526",
            "smtpd: listening on [::]:2527",
        ] == log_lines(logged, "listening on")
        parent.stopService()

    def test_unix_socket_mode_defaults_to_0660(self, cwd: Path) -> None:
        """unix: without mode= gets 0660; an explicit mode= is kept."""
        plain, explicit = parse(
            *DISCARD,
            "-p",
            f"unix:{cwd / 'a.sock'}",
            "-p",
            f"unix:{cwd / 'b.sock'}:mode=600",
        )["endpoints"]
        assert (0o660, 0o600) == (plain._mode, explicit._mode)

    @pytest_twisted.inlineCallbacks
    def test_unix_socket_file_is_0660(self, tmp_path: Path) -> Any:
        """The socket file itself: group members may connect, others may not.

        Before: Twisted's default, 0666 (every local user).
        """
        import stat

        path = tmp_path / "smtpd.sock"
        options = Options()
        options.parseOptions([*DISCARD, "-p", f"unix:{path}"])
        (endpoint,) = options["endpoints"]
        port = yield endpoint.listen(SMTPFactory(discard, hostname="mx.test"))
        try:
            assert 0o660 == stat.S_IMODE(os.stat(path).st_mode)
        finally:
            yield port.stopListening()


class TestSystemd:
    def passed(self, count: int = 0, names: str = "") -> Any:
        """Twisted's record of the sockets systemd passed (descriptors 3...)."""
        from twisted.python.systemd import ListenFDs

        return ListenFDs(
            list(range(3, 3 + count)), tuple(names.split(":")) if names else ()
        )

    def endpoint(self, description: str, passed: Any) -> Any:
        from twisted_smtpd.tap import systemd_endpoint

        args, kwargs = endpoints._parse(description)
        return systemd_endpoint(None, description, kwargs, passed)

    def error(self, description: str, passed: Any) -> str:
        with pytest.raises(usage.UsageError) as raised:
            self.endpoint(description, passed)
        message = str(raised.value)
        assert "\n" not in message
        return message

    def test_index(self) -> None:
        endpoint = self.endpoint("systemd:domain=INET:index=1", self.passed(2, "a:b"))
        assert isinstance(endpoint, endpoints.AdoptedStreamServerEndpoint)
        assert (4, socket.AF_INET) == (endpoint.fileno, endpoint.addressFamily)

    def test_named_socket(self) -> None:
        endpoint = self.endpoint(
            "systemd:domain=INET6:name=smtp", self.passed(2, "metrics:smtp")
        )
        assert (4, socket.AF_INET6) == (endpoint.fileno, endpoint.addressFamily)

    def test_nothing_passed(self) -> None:
        """No socket (and descriptor 3+N is not one): one line saying so.

        Before: "list index out of range".
        """
        message = self.error("systemd:domain=INET:index=40", self.passed())
        assert message.startswith("systemd passed no socket to this process")
        assert "descriptor 43 is not a listening INET socket" in message

    def test_index_out_of_range(self) -> None:
        message = self.error("systemd:domain=INET:index=2", self.passed(2, "a:b"))
        assert "systemd passed 2 socket(s); index=2 is out of range" == message

    def test_name_without_fdnames(self) -> None:
        message = self.error("systemd:domain=INET:name=smtp", self.passed())
        assert message.startswith("name= needs LISTEN_FDNAMES")

    def test_unknown_name(self) -> None:
        message = self.error("systemd:domain=INET:name=smtp", self.passed(1, "other"))
        assert "systemd passed no socket named 'smtp' (LISTEN_FDNAMES=other)" == message

    def test_bad_domain(self) -> None:
        message = self.error("systemd:domain=IPX:index=0", self.passed(1, "a"))
        assert "domain= must be INET, INET6 or UNIX" == message

    def test_one_line_from_twistd(self, tmp_path: Path) -> None:
        """twistd itself stops with one line, not "list index out of range"."""
        status, lines = twistd_start_error(
            tmp_path, *DISCARD, "--port", "systemd:domain=INET:index=0"
        )
        assert 0 != status
        assert 1 == len(lines), lines
        assert lines[0].startswith(
            "twistd smtpd: error: bad --port 'systemd:domain=INET:index=0':"
            " systemd passed no socket to this process"
        )

    def test_socket_activation_end_to_end(self, tmp_path: Path) -> None:
        """A socket passed as systemd does (fd 3, LISTEN_FDS=1, no names) serves.

        Before: "list index out of range" (Twisted keeps no socket when
        LISTEN_FDNAMES is missing).
        """
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        launcher = (
            "import os, sys\n"
            "os.dup2(int(sys.argv[1]), 3)\n"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
            "os.environ.pop('LISTEN_FDNAMES', None)\n"
            "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
        )
        command = twistd_command(
            "smtpd", *DISCARD, "--port", "systemd:domain=INET:index=0"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", launcher, str(listener.fileno()), *command[1:]],
            cwd=tmp_path,
            env=twistd_env(),
            pass_fds=(listener.fileno(),),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        listener.close()
        try:
            wait_for_port(port, proc)
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                code, _ = smtp.noop()
        finally:
            proc.terminate()
            output, _ = proc.communicate(timeout=30)
        assert 250 == code, output
        assert f"smtpd: listening on 127.0.0.1:{port}" in output


class TestAuthFile:
    def test_missing_password_file_stops_start_up(
        self, cwd: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--auth file:/nonexistent is one line, not a warning and dead logins.

        Before: a warning, then every AUTH refused.
        """
        assert (
            "twistd smtpd: error: --auth file:/nonexistent: no such file"
            " (a password file of user:password lines)\n"
            == parse_error(capsys, *DISCARD, "--auth", "file:/nonexistent")
        )

    def test_existing_file_is_used(self, cwd: Path) -> None:
        passwords = cwd / "passwords"
        passwords.write_text("alice:secret\n")
        options = parse(*DISCARD, "--auth", f"file:{passwords}", "--auth-without-tls")
        assert options["auth_policy"] is not None

    def test_from_twistd(self, tmp_path: Path) -> None:
        status, lines = twistd_start_error(
            tmp_path, *DISCARD, "--auth", "file:/nonexistent"
        )
        assert 0 != status
        assert [
            "twistd smtpd: error: --auth file:/nonexistent: no such file"
            " (a password file of user:password lines)"
        ] == lines
