"""The package's public names are the implementations, re-exported."""

from __future__ import annotations

import importlib

import pytest

import twisted_smtpd

HOMES = {
    "AuthPolicy": "twisted_smtpd.auth",
    "Envelope": "twisted_smtpd._session",
    "Limits": "twisted_smtpd._session",
    "LMTPServerProtocol": "twisted_smtpd.protocol",
    "MaildirHandler": "twisted_smtpd.handlers",
    "MemoryHandler": "twisted_smtpd.handlers",
    "Reply": "twisted_smtpd.replies",
    "SMTPError": "twisted_smtpd.replies",
    "SMTPFactory": "twisted_smtpd.factory",
    "SMTPServerProtocol": "twisted_smtpd.protocol",
    "TLSInfo": "twisted_smtpd._session",
    "TLSPolicy": "twisted_smtpd.tls",
    "discard": "twisted_smtpd.handlers",
}


def test_all_is_complete() -> None:
    """__all__ lists exactly the documented public names and the version."""
    assert sorted([*HOMES, "__version__"]) == sorted(twisted_smtpd.__all__)


@pytest.mark.parametrize("name", sorted(HOMES))
def test_reexported(name: str) -> None:
    """Each public name is the object from its implementing module."""
    module = importlib.import_module(HOMES[name])
    assert getattr(module, name) is getattr(twisted_smtpd, name)
