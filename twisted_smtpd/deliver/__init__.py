# -*- test-case-name: tests.test_deliver -*-
"""
Hand-off targets behind C{--deliver TARGET}.

Each target is a handler (see L{twisted_smtpd.interfaces.Handler}) that
forwards what the client sends to a next hop, and answers the client's 250
only once that next hop holds the message (DESIGN.md section 5).  The
scheme of C{TARGET} picks the module; each module exposes
C{from_target(target, options, reactor) -> handler} and raises
C{ValueError} with one clear sentence for a target it cannot use.

    ============================  ===================================
    target                        module
    ============================  ===================================
    ``lmtp:ENDPOINT``             L{twisted_smtpd.deliver.lmtp}
    ``smtp:ENDPOINT``             L{twisted_smtpd.deliver.smtp}
    ``http://...``, ``https://``  L{twisted_smtpd.deliver.webhook}
    ``amqp://``, ``amqps://``     L{twisted_smtpd.deliver.amqp}
    ``redis://``, ``rediss://``   L{twisted_smtpd.deliver.redis}
    ``nats://``                   L{twisted_smtpd.deliver.nats}
    ============================  ===================================
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["DeliverOptions", "SCHEMES", "handler_from_target"]

#: Scheme (the part of the target before the first colon) -> module name.
SCHEMES: dict[str, str] = {
    "lmtp": "twisted_smtpd.deliver.lmtp",
    "smtp": "twisted_smtpd.deliver.smtp",
    "http": "twisted_smtpd.deliver.webhook",
    "https": "twisted_smtpd.deliver.webhook",
    "amqp": "twisted_smtpd.deliver.amqp",
    "amqps": "twisted_smtpd.deliver.amqp",
    "redis": "twisted_smtpd.deliver.redis",
    "rediss": "twisted_smtpd.deliver.redis",
    "nats": "twisted_smtpd.deliver.nats",
}


@dataclass(frozen=True)
class DeliverOptions:
    """What the command line says about every hand-off target.

    Args:
        timeout: seconds the next hop gets to answer each step before the
            client is told C{451 4.4.x}.
        ca_file: PEM file of CA certificates to verify the next hop's TLS
            certificate with (default: the system store).
        spool_dir: where a broker target keeps messages while the broker is
            unreachable (C{None}: answer 451 instead).
        lmtp: the server itself speaks LMTP (per-recipient replies pass
            through).
    """

    timeout: float = 60.0
    ca_file: Optional[str] = None
    spool_dir: Optional[str] = None
    lmtp: bool = False


def handler_from_target(
    target: str, options: Optional[DeliverOptions] = None, reactor: Any = None
) -> Any:
    """The handler that delivers to C{target}.

    Raises:
        ValueError: unknown scheme, bad syntax, or a missing extra (the
            message says which C{pip install 'twisted_smtpd[...]'} to run).
    """
    scheme = target.split(":", 1)[0].lower()
    module_name = SCHEMES.get(scheme)
    if module_name is None:
        known = ", ".join(sorted(SCHEMES))
        raise ValueError(f"unknown --deliver scheme {scheme!r} (known: {known})")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--deliver {scheme}: is not available here: {error}")
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    return module.from_target(target, options or DeliverOptions(), reactor)
