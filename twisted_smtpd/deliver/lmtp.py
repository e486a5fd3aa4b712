# -*- test-case-name: tests.test_deliver_lmtp -*-
"""
C{--deliver lmtp:ENDPOINT}: hand mail to an LMTP server (Dovecot, Cyrus).

    --deliver lmtp:unix:/run/dovecot/lmtp
    --deliver lmtp:tcp:127.0.0.1:24:pool=8

MAIL and RCPT are forwarded as the client sends them (Dovecot's "unknown
user" is the client's RCPT reply); the body streams into the LMTP DATA; the
client's 250 waits for every recipient's LMTP reply (see
L{combine_lmtp_replies <twisted_smtpd.deliver._proxy.combine_lmtp_replies>}
for mixed results).
"""

from __future__ import annotations

from typing import Any, Optional

from . import DeliverOptions
from ._proxy import ProxyHandler, parse_endpoint

__all__ = ["LMTPHandler", "from_target"]

_KEYS = frozenset({"pool", "lhlo"})


class LMTPHandler(ProxyHandler):
    """Deliver through an LMTP server, one downstream transaction per client's.

    Args:
        endpoint: a Twisted client endpoint string, C{unix:PATH} or
            C{tcp:HOST:PORT}.
        timeout: seconds the LMTP server gets per step (451 4.4.2 past it).
        pool_size: connections to the LMTP server at most.
        lhlo: the name this server gives in LHLO (default: its FQDN).
        reactor: the reactor (default the global one).
    """

    lmtp = True

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: float = 60.0,
        pool_size: int = 16,
        lhlo: Optional[str] = None,
        reactor: Any = None,
    ) -> None:
        parsed = parse_endpoint("lmtp", "lmtp:" + endpoint, _KEYS, reactor)
        super().__init__(parsed, reactor, timeout, pool_size, helo=lhlo)


def pool_size(options: dict[str, str], target: str) -> int:
    value = options.get("pool", "16")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"--deliver {target!r}: pool= must be a positive number")
    return int(value)


def from_target(target: str, options: DeliverOptions, reactor: Any) -> LMTPHandler:
    """C{lmtp:ENDPOINT[:pool=N][:lhlo=NAME]} -> an L{LMTPHandler}."""
    parsed = parse_endpoint("lmtp", target, _KEYS, reactor)
    return LMTPHandler(
        parsed.description,
        timeout=options.timeout,
        pool_size=pool_size(parsed.options, target),
        lhlo=parsed.options.get("lhlo") or None,
        reactor=reactor,
    )
