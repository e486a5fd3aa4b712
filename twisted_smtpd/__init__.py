"""
twisted_smtpd: an SMTP/ESMTP server for Twisted, in the style of net/http.

    factory = SMTPFactory(handle, hostname="mx.example.org")
    serverFromString(reactor, "tcp:2525").listen(factory)
"""

__version__ = "0.1.0"

from ._session import Envelope, Limits, TLSInfo
from .factory import SMTPFactory
from .protocol import SMTPServerProtocol
from .replies import Reply, SMTPError

__all__ = [
    "Envelope",
    "Limits",
    "Reply",
    "SMTPError",
    "SMTPFactory",
    "SMTPServerProtocol",
    "TLSInfo",
    "__version__",
]
