"""PROXY protocol: behind HAProxy the session sees the real client."""

from __future__ import annotations

import smtplib
import socket

import pytest_twisted
from twisted.internet import endpoints, reactor, threads

from twisted_smtpd import Limits, SMTPFactory
from twisted_smtpd.handlers import MemoryHandler
from twisted_smtpd.proxy import use_proxy_header_wrapper
from twisted_smtpd.tap import Options

V1 = b"PROXY TCP4 203.0.113.9 192.0.2.1 51000 25\r\n"


@pytest_twisted.inlineCallbacks
def test_real_client_address_and_limits():
    """envelope.peer and per-IP limits use the address from the PROXY header."""
    memory = MemoryHandler()
    factory = SMTPFactory(
        memory, hostname="mx.test", limits=Limits(max_connections_per_ip=1)
    )
    endpoint = use_proxy_header_wrapper(
        endpoints.serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1")
    )
    port = yield endpoint.listen(factory)
    number = port.getHost().port

    def client():
        with socket.create_connection(("127.0.0.1", number), timeout=10) as first:
            first.sendall(V1)  # the header alone: the greeting must follow it
            reader = first.makefile("rb")
            assert reader.readline().startswith(b"220 ")
            with socket.create_connection(("127.0.0.1", number), timeout=10) as dup:
                dup.sendall(V1)
                refused = dup.makefile("rb").readline()
            other = b"PROXY TCP4 198.51.100.4 192.0.2.1 51001 25\r\n"
            with socket.create_connection(("127.0.0.1", number), timeout=10) as sock:
                sock.sendall(other)
                smtp = smtplib.SMTP()
                smtp.sock = sock
                smtp.file = None
                assert 220 == smtp.getreply()[0]
                smtp.sendmail("a@b.example", ["c@d.example"], b"behind haproxy\r\n")
                smtp.quit()
        return refused

    try:
        refused = yield threads.deferToThread(client)
    finally:
        yield port.stopListening()
    assert refused.startswith(b"421 ")
    envelope = memory.messages[0]
    assert "198.51.100.4" == envelope.peer.host
    assert b"([198.51.100.4])" in envelope.received_header


def test_tap_uses_the_header_aware_wrapper() -> None:
    """twistd smtpd --port haproxy:... gets the wrapper that waits for the header."""
    options = Options()
    options.parseOptions(
        ["--port", "haproxy:tcp:2525", "--handler", "twisted_smtpd.handlers.discard"]
    )
    endpoint = options["endpoints"][0]
    assert "ProxyHeaderWrappingFactory" == endpoint._wrapperFactory.__name__
