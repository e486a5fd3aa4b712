# -*- test-case-name: tests.test_xclient -*-
"""
The client as the session knows it: its address in log lines and allow-lists,
and what XCLIENT (Postfix's XCLIENT_README) changes about it.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger

from ._session import Session
from ._xclient import UNKNOWN, AddressList, XClientUpdate, parse_xclient
from .replies import R501_SYNTAX_XCLIENT, R550_XCLIENT_DENIED, SMTPError

__all__ = [
    "peer_host",
    "address_text",
    "forwarded_peer",
    "xclient_update",
    "forward_client",
]

_log = Logger(namespace="twisted_smtpd.protocol")


def peer_host(address: Any) -> Optional[str]:
    """The IP address text of a TCP peer; None for UNIX sockets and the like."""
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else None


def address_text(address: Any) -> str:
    """C{host:port}, C{[v6]:port}, or the address as text."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def forwarded_peer(peer: Any, update: XClientUpdate) -> Any:
    """The client XCLIENT names: its ADDR and PORT, the rest as before."""
    if update.addr is None and update.port is None:
        return peer
    host = update.addr if update.addr is not None else peer_host(peer) or UNKNOWN
    port = update.port if update.port is not None else getattr(peer, "port", 0)
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


def xclient_update(session: Session, argument: str) -> XClientUpdate:
    """C{XCLIENT argument} from this session's client: what it says.

    Raises:
        SMTPError: 501 without attributes or with malformed ones; 550 from a
            client not allowed to send XCLIENT (logged).
    """
    if not argument:
        raise SMTPError(R501_SYNTAX_XCLIENT)
    if not session.xclient_allowed:
        _log.info(
            "smtpd session {session_id}: XCLIENT refused to {peer}",
            session_id=session.session_id,
            peer=address_text(session.peer),
        )
        raise SMTPError(R550_XCLIENT_DENIED)
    return parse_xclient(argument)


def forward_client(
    session: Session, update: XClientUpdate, allowed: AddressList
) -> tuple[str, Optional[str]]:
    """XCLIENT: the session is now the client the proxy names.

    The name the proxy gives replaces any lookup; a new address loses the
    old name.  The forwarded client may send XCLIENT only if it is itself
    allowed to (as in Postfix).

    Returns:
        The former client's IP (for connection accounting), and what to do
        about the name: C{None} keep the lookup in progress, C{""} drop it,
        an address: drop it and look that address up.
    """
    before = session.peer
    old_ip = peer_host(before) or ""
    session.peer = forwarded_peer(before, update)
    name: Optional[str] = None
    if update.name is not None:
        session.peer_name = update.name
        name = ""
    elif update.addr is not None and update.addr != old_ip:
        session.peer_name = None
        name = "" if update.addr == UNKNOWN else update.addr
    session.xclient(update.helo, update.proto == "ESMTP", update.login)
    session.xclient_allowed = peer_host(session.peer) in allowed
    _log.info(
        "smtpd session {session_id}: XCLIENT from {proxy}: client {peer}",
        session_id=session.session_id,
        proxy=address_text(before),
        peer=address_text(session.peer),
    )
    return old_ip, name
