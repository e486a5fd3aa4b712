"""The listen backlog of --port listeners (issue 11 item 6).

The 10,000-simultaneous-connections figure is measured by bench/backlog.py,
not here: these tests check the number each listener is given and gets.
"""

from __future__ import annotations

import socket
import subprocess

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory, Protocol

from twisted_smtpd.tap import DEFAULT_BACKLOG, Options, listen_backlog

from .helpers import require_program


def endpoint_backlog(endpoint) -> int:
    """The backlog of the listening endpoint C{endpoint} is or wraps."""
    while not hasattr(endpoint, "_backlog"):
        endpoint = endpoint._wrappedEndpoint
    return endpoint._backlog


def parsed_endpoint(description: str, *more: str):
    options = Options()
    options.parseOptions(
        ["--handler", "twisted_smtpd.handlers.discard", "--port", description, *more]
    )
    return options["endpoints"][0]


class TestDefault:
    @pytest.mark.parametrize(
        ("somaxconn", "expected"),
        [("128\n", 128), ("65535\n", DEFAULT_BACKLOG), ("4096", 4096)],
    )
    def test_capped_by_somaxconn(self, tmp_path, somaxconn, expected) -> None:
        """4096 unless net.core.somaxconn is lower."""
        path = tmp_path / "somaxconn"
        path.write_text(somaxconn)
        assert expected == listen_backlog(str(path))

    def test_without_proc(self, tmp_path) -> None:
        """No /proc (or junk in it): the C library's SOMAXCONN caps it."""
        junk = tmp_path / "junk"
        junk.write_text("many")
        expected = min(DEFAULT_BACKLOG, socket.SOMAXCONN)
        assert expected == listen_backlog(str(tmp_path / "missing"))
        assert expected == listen_backlog(str(junk))


class TestEndpoints:
    @pytest.mark.parametrize(
        "description",
        ["tcp:0", "tcp6:0:interface=\\:\\:1", "haproxy:tcp:0", "unix:{dir}/s"],
    )
    def test_default_and_override(self, tmp_path, description) -> None:
        """Every listener type gets the default; backlog= in the string wins."""
        description = description.format(dir=tmp_path)
        assert listen_backlog() == endpoint_backlog(parsed_endpoint(description))
        assert 77 == endpoint_backlog(parsed_endpoint(description + ":backlog=77"))

    def test_ssl(self, tmp_path, certificates) -> None:
        """ssl: listeners, with their own certificate or the --tls-cert one."""
        cert, key = certificates["cert"], certificates["key"]
        own = f"ssl:0:privateKey={key}:certKey={cert}"
        shared = ("--tls-cert", str(cert), "--tls-key", str(key))
        assert listen_backlog() == endpoint_backlog(parsed_endpoint(own))
        assert 9 == endpoint_backlog(parsed_endpoint(own + ":backlog=9"))
        assert listen_backlog() == endpoint_backlog(parsed_endpoint("ssl:0", *shared))
        assert 9 == endpoint_backlog(parsed_endpoint("ssl:0:backlog=9", *shared))


def kernel_backlog(port: int) -> int:
    """What the kernel holds for a listening socket: Send-Q in ``ss -ltn``."""
    output = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return int(output.split()[2])


@pytest.mark.parametrize(
    ("suffix", "expected"), [("", listen_backlog()), (":backlog=77", 77)]
)
@pytest_twisted.inlineCallbacks
def test_listening_socket_gets_it(suffix, expected):
    """The socket a --port endpoint listens on has that backlog in the kernel."""
    require_program("ss")
    endpoint = parsed_endpoint(f"tcp:0:interface=127.0.0.1{suffix}")
    port = yield endpoint.listen(Factory.forProtocol(Protocol))
    try:
        assert expected == kernel_backlog(port.getHost().port)
    finally:
        yield port.stopListening()
