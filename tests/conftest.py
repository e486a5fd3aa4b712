from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from twisted_smtpd import SMTPFactory
from twisted_smtpd.handlers import MemoryHandler
from twisted_smtpd.testing import FakeClient, connect


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def memory() -> MemoryHandler:
    return MemoryHandler()


@pytest.fixture
def factory(memory: MemoryHandler, clock: Clock) -> SMTPFactory:
    return SMTPFactory(memory, hostname="mx.test", reactor=clock)


@pytest.fixture
def client(factory: SMTPFactory) -> FakeClient:
    c = connect(factory)
    c.replies()  # the greeting
    return c


@pytest.fixture(scope="session")
def certificates(tmp_path_factory):
    """Paths of a CA, a server certificate (with chain) and its key."""
    from .certs import make_certificates

    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def listen():
    """Start servers on free loopback ports; stop them after the test.

    C{listen(handler, ssl_context=None, **factory_kwargs)} returns the port
    number; with an C{ssl_context} the listener is implicit TLS.
    """
    from twisted.internet import reactor

    ports = []
    factories = []

    def start(handler, ssl_context=None, **kwargs):
        kwargs.setdefault("hostname", "mx.test")
        factory = SMTPFactory(handler, **kwargs)
        factories.append(factory)
        if ssl_context is not None:
            port = reactor.listenSSL(
                0, factory, ssl_context, interface="127.0.0.1", backlog=1024
            )
        else:
            port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=1024)
        ports.append(port)
        return port.getHost().port

    start.factories = factories  # the factories started, in order
    yield start
    for port in ports:
        port.stopListening()


@pytest.fixture
def deliver_to(listen):
    """C{deliver_to(target, **DeliverOptions)}: an SMTP server on a free port
    handing mail to that C{--deliver} target; (handler, port).  The handlers
    are stopped after the test."""
    from twisted.internet import reactor

    from twisted_smtpd.deliver import DeliverOptions, handler_from_target

    handlers = []

    def start(target: str, **options):
        handler = handler_from_target(target, DeliverOptions(**options), reactor)
        handlers.append(handler)
        return handler, listen(handler)

    yield start
    for handler in handlers:
        handler.stop()
