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
