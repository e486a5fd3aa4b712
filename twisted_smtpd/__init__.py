"""
twisted_smtpd: an SMTP/ESMTP server for Twisted, in the style of net/http.

    factory = SMTPFactory(handle, hostname="mx.example.org")
    serverFromString(reactor, "tcp:2525").listen(factory)
"""

__version__ = "0.1.0"

from ._session import Envelope, Limits, TLSInfo
from .auth import AuthPolicy
from .factory import SMTPFactory
from .handlers import MaildirHandler, MemoryHandler, discard
from .protocol import SMTPServerProtocol
from .replies import Reply, SMTPError
from .tls import TLSPolicy

__all__ = [
    "AuthPolicy",
    "Envelope",
    "Limits",
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
