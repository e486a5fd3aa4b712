"""
twisted_smtpd: an SMTP/ESMTP server for Twisted, in the style of net/http.

    factory = SMTPFactory(handle, hostname="mx.example.org")
    serverFromString(reactor, "tcp:2525").listen(factory)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The names are imported on first use: pytest imports this package at start-up
# in every project that installs it (the pytest11 entry point), and that must
# not cost the import of Twisted.
_HOMES = {
    "AuthPolicy": ".auth",
    "Envelope": "._session",
    "Limits": "._session",
    "LMTPServerProtocol": ".protocol",
    "MaildirHandler": ".handlers",
    "MemoryHandler": ".handlers",
    "Reply": ".replies",
    "SMTPError": ".replies",
    "SMTPFactory": ".factory",
    "SMTPServerProtocol": ".protocol",
    "TLSInfo": "._session",
    "TLSPolicy": ".tls",
    "discard": ".handlers",
}

if TYPE_CHECKING:
    from ._session import Envelope, Limits, TLSInfo
    from .auth import AuthPolicy
    from .factory import SMTPFactory
    from .handlers import MaildirHandler, MemoryHandler, discard
    from .protocol import LMTPServerProtocol, SMTPServerProtocol
    from .replies import Reply, SMTPError
    from .tls import TLSPolicy


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__all__ = [
    "AuthPolicy",
    "Envelope",
    "Limits",
    "LMTPServerProtocol",
    "MaildirHandler",
    "MemoryHandler",
    "Reply",
    "SMTPError",
    "SMTPFactory",
    "SMTPServerProtocol",
    "TLSInfo",
    "TLSPolicy",
    "discard",
    "__version__",
]
