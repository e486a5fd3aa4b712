# -*- test-case-name: tests.test_xclient -*-
"""
XCLIENT (Postfix's XCLIENT_README): the attribute parser and the allow-list.

A proxy or filter in front of the server (nginx's mail proxy, a content
filter, swaks in a test) says who the real client is::

    XCLIENT NAME=spike.example.org ADDR=192.0.2.7 PORT=4711 HELO=spike.example.org

Values are xtext (RFC 3461 4): C{+XX} is the octet XX.  NAME, ADDR, PORT,
HELO, LOGIN, DESTADDR and DESTPORT may be C{[UNAVAILABLE]}, NAME also
C{[TEMPUNAVAIL]} (any case).  Names are case-insensitive; a repeated attribute
keeps its last value, as in Postfix.

Nothing here does I/O or imports Twisted: L{parse_xclient} takes the argument
text and returns an L{XClientUpdate}, or raises L{SMTPError} with the precise
501 5.5.4.  One difference from Postfix, on purpose: a malformed xtext escape
is a 501, not silently taken as the raw text (that fallback served Postfix
before 2.3, which sent unencoded values).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional, Union

from .replies import (
    R501_SYNTAX_XCLIENT,
    R501_XCLIENT_EXPECTED,
    R501_XCLIENT_NAME,
    R501_XCLIENT_TOO_LONG,
    R501_XCLIENT_VALUE,
    SMTPError,
    fill,
)

__all__ = [
    "ATTRIBUTES",
    "UNKNOWN",
    "XClientUpdate",
    "AddressList",
    "parse_xclient",
    "xtext_decode",
    "normalize_address",
]

#: the attributes this server takes, in the order EHLO lists them
ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT")
#: what an unavailable name or address becomes (Postfix's word)
UNKNOWN = "unknown"

_UNAVAILABLE = "[UNAVAILABLE]"
_TEMPUNAVAIL = "[TEMPUNAVAIL]"
#: Postfix: "syntactically valid NAME and HELO values can be up to 255 characters"
_MAX_VALUE = 255
_XTEXT_ESCAPE = re.compile(r"\+([0-9A-Fa-f]{2})")
_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
# Characters that could break a header or a log line where HELO appears.
_NEUTER = str.maketrans({c: "?" for c in ' <>()\\";@'})


@dataclass(frozen=True)
class XClientUpdate:
    """What one XCLIENT command said; C{None} means the attribute was not sent.

    Attributes:
        name: the client's host name, or L{UNKNOWN} when unavailable.
        name_temporary: NAME was C{[TEMPUNAVAIL]} (the lookup failed for now).
        addr: the client's IP address in canonical form, or L{UNKNOWN}.
        port: the client's TCP port, C{0} when unavailable.
        proto: C{"SMTP"} or C{"ESMTP"}.
        helo: the HELO/EHLO name, C{""} when unavailable.
        login: the SASL login name, C{""} when unavailable (not logged in).
        dest_addr: the server address the client connected to, or L{UNKNOWN}.
        dest_port: the server port the client connected to, C{0} if unavailable.
    """

    name: Optional[str] = None
    name_temporary: bool = False
    addr: Optional[str] = None
    port: Optional[int] = None
    proto: Optional[str] = None
    helo: Optional[str] = None
    login: Optional[str] = None
    dest_addr: Optional[str] = None
    dest_port: Optional[int] = None


def xtext_decode(value: str) -> str:
    """Decode xtext (RFC 3461 4); ValueError if a C{+} lacks its two hex digits."""
    if "+" not in value:
        return value
    decoded = _XTEXT_ESCAPE.sub(lambda match: chr(int(match.group(1), 16)), value)
    if value.count("+") != len(_XTEXT_ESCAPE.findall(value)):
        raise ValueError(f"bad xtext: {value!r}")
    return decoded


def normalize_address(text: str) -> str:
    """An IPv4 address, or IPv6 with or without C{IPV6:}, in canonical form.

    An IPv4-mapped IPv6 address becomes the IPv4 address.  ValueError if
    C{text} is neither.
    """
    if text[:5].upper() == "IPV6:":
        address: Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
        address = ipaddress.IPv6Address(text[5:])
    else:
        address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return str(address)


def valid_hostname(name: str) -> bool:
    """A host name as Postfix's C{valid_hostname}: LDH(+_) labels, not numeric."""
    if not name or len(name) > _MAX_VALUE:
        return False
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return False
    return not all(label.isdigit() for label in labels)


def _printable(value: str) -> str:
    """Control and non-ASCII characters masked with C{?}, as Postfix does."""
    return "".join(c if " " <= c <= "~" else "?" for c in value)


def _port(name: str, value: str) -> int:
    if value.upper() == _UNAVAILABLE:
        return 0
    if not value.isdigit() or len(value) > 5 or int(value) > 65535:
        raise SMTPError(fill(R501_XCLIENT_VALUE, name=name, value=value))
    return int(value)


def _address(name: str, value: str) -> str:
    if value.upper() == _UNAVAILABLE:
        return UNKNOWN
    try:
        return normalize_address(value)
    except ValueError:
        raise SMTPError(fill(R501_XCLIENT_VALUE, name=name, value=value)) from None


def parse_xclient(argument: str) -> XClientUpdate:
    """The attributes of C{XCLIENT attribute=value...}; 501 5.5.4 if malformed."""
    items = argument.split()
    if not items:
        raise SMTPError(R501_SYNTAX_XCLIENT)
    fields: dict[str, object] = {}
    for item in items:
        name, equals, raw = item.partition("=")
        if not equals or not raw:
            raise SMTPError(R501_XCLIENT_EXPECTED)
        if len(raw) > _MAX_VALUE:
            raise SMTPError(R501_XCLIENT_TOO_LONG)
        name = name.upper()
        if name not in ATTRIBUTES:
            raise SMTPError(fill(R501_XCLIENT_NAME, name=_printable(name)))
        try:
            value = _printable(xtext_decode(raw))
        except ValueError:
            raise SMTPError(
                fill(R501_XCLIENT_VALUE, name=name, value=_printable(raw))
            ) from None
        upper = value.upper()
        if name == "NAME":
            if upper in (_UNAVAILABLE, _TEMPUNAVAIL):
                fields["name"] = UNKNOWN
                fields["name_temporary"] = upper == _TEMPUNAVAIL
            elif valid_hostname(value):
                fields["name"] = value
                fields["name_temporary"] = False
            else:
                raise SMTPError(fill(R501_XCLIENT_VALUE, name=name, value=value))
        elif name == "ADDR":
            fields["addr"] = _address(name, value)
        elif name == "DESTADDR":
            fields["dest_addr"] = _address(name, value)
        elif name == "PORT":
            fields["port"] = _port(name, value)
        elif name == "DESTPORT":
            fields["dest_port"] = _port(name, value)
        elif name == "PROTO":
            if upper not in ("SMTP", "ESMTP"):
                raise SMTPError(fill(R501_XCLIENT_VALUE, name=name, value=value))
            fields["proto"] = upper
        elif name == "HELO":
            fields["helo"] = "" if upper == _UNAVAILABLE else value.translate(_NEUTER)
        else:  # LOGIN
            fields["login"] = "" if upper == _UNAVAILABLE else value
    return XClientUpdate(**fields)  # type: ignore[arg-type]


class AddressList:
    """Networks in CIDR notation (or single addresses): who may use XCLIENT.

    An IPv4-mapped IPv6 client (C{::ffff:192.0.2.1}) matches IPv4 networks.

    Raises:
        ValueError: with one clear line naming the bad entry.
    """

    def __init__(self, networks: Iterable[str] = ()) -> None:
        parsed = []
        for text in networks:
            try:
                parsed.append(ipaddress.ip_network(text.strip(), strict=True))
            except ValueError as error:
                raise ValueError(f"bad network {text!r}: {error}") from None
        self.networks = tuple(parsed)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, host: object) -> bool:
        if not self.networks or not isinstance(host, str):
            return False
        try:
            address = ipaddress.ip_address(normalize_address(host))
        except ValueError:
            return False  # "unknown", a UNIX socket path...
        return any(address in network for network in self.networks)

    def __repr__(self) -> str:
        return f"AddressList({[str(n) for n in self.networks]!r})"
