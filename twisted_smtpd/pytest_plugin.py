"""
pytest fixtures for a real SMTP server per test: C{smtpd}, C{smtpd_factory},
C{smtpd_session}.  Registered through the C{pytest11} entry point (switch it
off with C{-p no:twisted_smtpd})::

    def test_signup_sends_mail(smtpd):
        signup("ann@example.org", smtp_host=smtpd.host, smtp_port=smtpd.port)
        [message] = smtpd.wait_for(1)
        assert message["To"] == "ann@example.org"

Importing this module is cheap on purpose (pytest imports it in every run of
every project that installs twisted_smtpd): Twisted and the server are
imported inside the fixtures, and no reactor is installed here.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Callable, Optional

import pytest

if TYPE_CHECKING:
    from .testserver import SMTPTestServer

__all__ = ["smtpd", "smtpd_factory", "smtpd_session"]

#: the servers a test used, and the first session of each that is its own
_USED = pytest.StashKey[list[tuple["SMTPTestServer", int]]]()
_session_server: list[SMTPTestServer] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "smtpd(**options): options for the smtpd fixture: tls='starttls' or"
        " 'implicit', require_tls, auth={user: password} or 'any', require_auth,"
        " max_message_size, max_recipients, hostname, mode='thread' or 'reactor'",
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    testserver = sys.modules.get("twisted_smtpd.testserver")
    if testserver is None:
        return  # no fixture was used: nothing was started
    for server in _session_server:
        server.stop()
    _session_server.clear()
    testserver.stop_reactor_thread()


def _reactor_mode(request: pytest.FixtureRequest) -> bool:
    """Whether pytest-twisted runs this test's body inside its reactor."""
    twisted_plugin = sys.modules.get("pytest_twisted")
    if twisted_plugin is None or not request.config.pluginmanager.hasplugin("twisted"):
        return False
    function = getattr(request.node, "obj", None)
    mark = getattr(function, "_pytest_twisted_mark", None)
    return mark in ("async_test", "inline_callbacks_test")


def _start(request: pytest.FixtureRequest, options: dict[str, Any]) -> SMTPTestServer:
    from .testserver import start_server

    mode = options.pop("mode", None) or (
        "reactor" if _reactor_mode(request) else "thread"
    )
    reactor = None
    if mode == "reactor":
        twisted_plugin = sys.modules.get("pytest_twisted")
        reactor = twisted_plugin._instances.reactor if twisted_plugin else None
        if reactor is None:
            # Nothing would run the reactor: every client would hang.
            raise pytest.UsageError(
                "smtpd: mode='reactor' needs pytest-twisted (or use trial's"
                " SMTPServerMixin)"
            )
    return start_server(mode=mode, reactor=reactor, **options)


def _stop(server: SMTPTestServer) -> None:
    result = server.stop()
    if not server.threaded:
        # Reactor mode under pytest-twisted: let its reactor finish the stop.
        twisted_plugin = sys.modules.get("pytest_twisted")
        if twisted_plugin is not None and twisted_plugin._instances.reactor:
            twisted_plugin.blockon(result)


def _use(request: pytest.FixtureRequest, server: SMTPTestServer, first: int) -> None:
    used = request.node.stash.setdefault(_USED, [])
    used.append((server, first))


@pytest.fixture
def smtpd_factory(request: pytest.FixtureRequest) -> Any:
    """Start servers with options; each stops after the test::

        def test_tls(smtpd_factory):
            server = smtpd_factory(tls="implicit", auth={"ann": "secret"})

    Options: see L{twisted_smtpd.testserver.start_server}; plus
    C{mode="thread"} or C{"reactor"} (default: reactor mode for
    pytest-twisted's inlineCallbacks/ensureDeferred tests, else thread).
    """
    servers: list[SMTPTestServer] = []

    def make(**options: Any) -> SMTPTestServer:
        server = _start(request, options)
        servers.append(server)
        _use(request, server, 0)
        return server

    yield make
    for server in servers:
        _stop(server)


@pytest.fixture
def smtpd(request: pytest.FixtureRequest, smtpd_factory: Callable[..., Any]) -> Any:
    """A real SMTP server on 127.0.0.1 and a free port, fresh for this test.

    C{.host}, C{.port}, C{.messages}, C{.wait_for(count, timeout)},
    C{.clear()}, C{.transcript}, C{.ssl_context}, fault rules
    (C{.fail}, C{.delay}, C{.hold}, C{.disconnect}, C{.throttle}, C{.greylist}).
    Options come from C{@pytest.mark.smtpd(...)}.
    """
    marker = request.node.get_closest_marker("smtpd")
    options = dict(marker.kwargs) if marker is not None else {}
    return smtpd_factory(**options)


@pytest.fixture(scope="session")
def smtpd_session() -> Any:
    """One server (thread mode) for the whole run: call C{reset()} as needed.

    Its fault rules and messages carry over from test to test; a failing
    test's report shows only the sessions that began during that test.
    """
    from .testserver import start_server

    if not _session_server:
        _session_server.append(start_server(mode="thread"))
    return _session_server[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    # Where the shared server's sessions for this test begin.
    first = len(_session_server[0].sessions) if _session_server else 0
    yield
    if "smtpd_session" in getattr(item, "fixturenames", ()) and _session_server:
        _use_item(item, _session_server[0], first)


def _use_item(item: pytest.Item, server: SMTPTestServer, first: int) -> None:
    used = item.stash.setdefault(_USED, [])
    if all(s is not server for s, _ in used):
        used.append((server, first))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    used: Optional[list[tuple[SMTPTestServer, int]]] = item.stash.get(_USED, None)
    if not used:
        return
    for index, (server, first) in enumerate(used):
        sessions = server.sessions[first:]
        text = "\n".join(str(s) for s in sessions) or "(no SMTP sessions)"
        where = f"{server.host}:{server.port}"
        name = "smtpd transcript" + (f" {index + 1}" if len(used) > 1 else "")
        report.sections.append((f"{name} ({where}) {report.when}", text))
