# -*- test-case-name: tests.test_commands -*-
"""
Pure parsing of SMTP command lines, paths and ESMTP parameters (RFC 5321, 6531).

Nothing here does I/O or imports Twisted: functions take text and return values,
or raise L{SMTPError} carrying the reply the client should get.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, NamedTuple

from .replies import (
    R501_BAD_PARAMETER,
    R501_BAD_RECIPIENT,
    R501_BAD_SENDER,
    R501_SYNTAX_HELO,
    R501_SYNTAX_MAIL,
    R501_SYNTAX_RCPT,
    R553_NEEDS_SMTPUTF8,
    R555_UNKNOWN_PARAMETER,
    SMTPError,
    fill,
)

__all__ = [
    "Command",
    "parse_command",
    "split_command",
    "parse_helo",
    "parse_mail",
    "parse_rcpt",
    "parse_address",
    "MAIL_PARAMETERS",
    "RCPT_PARAMETERS",
]


class Command(NamedTuple):
    """A command line split into an upper-case verb and its argument text."""

    verb: str
    argument: str


def decode_line(line: bytes) -> str:
    """Bytes from the wire as text; invalid UTF-8 survives as surrogates."""
    try:
        return line.decode("ascii")
    except UnicodeDecodeError:
        return line.decode("utf-8", "surrogateescape")


#: builds a Command without NamedTuple's Python-level __new__ (per line)
_new_command = tuple.__new__


#: the commands without an argument, as sent: their Command (a shared tuple)
#: without decoding and splitting the line, one dict look-up per line instead
_BARE_COMMANDS: dict[bytes, Command] = {
    spelled: _new_command(Command, (verb, ""))
    for verb in ("DATA", "QUIT", "RSET", "NOOP", "HELP", "STARTTLS")
    for spelled in (verb.encode("ascii"), verb.lower().encode("ascii"))
}


def parse_command(line: bytes) -> Command:
    """Split a command line (without CRLF) into verb and argument."""
    bare = _BARE_COMMANDS.get(line)
    if bare is not None:
        return bare
    verb, argument = _split(line)
    return _new_command(Command, (verb, argument))


def split_command(line: bytes) -> tuple[str, str]:
    """L{parse_command} as a plain C{(verb, argument)} tuple: the protocol's
    form, once per line (building the L{Command} costs a third more)."""
    bare = _BARE_COMMANDS.get(line)
    if bare is not None:
        return bare
    return _split(line)


def _split(line: bytes) -> tuple[str, str]:
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        text = line.decode("utf-8", "surrogateescape")
        verb, _, argument = text.partition(" ")
        if not verb.isascii():
            # str.upper() folds some non-ASCII letters into ASCII ones
            # ("maıl" -> "MAIL", "ſtarttlſ" -> "STARTTLS"): such a verb is no
            # command, or we would read a line otherwise than a filter before us.
            return verb, argument.strip(" ")
        return verb.upper(), argument.strip(" ")
    verb, _, argument = text.partition(" ")
    return verb.upper(), argument.strip(" ")


# RFC 5321 4.1.2 / RFC 6531 3.3 -------------------------------------------------
# UTF8-non-ascii: any non-ASCII character but the lone surrogates that stand for
# bytes that were not UTF-8 (decode_line's surrogateescape).
_U = r"\u0080-\ud7ff\ue000-\U0010ffff"
_ATEXT = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_U}]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED_STRING = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_U}]|\\[\x20-\x7e])*"'
_LETTER_DIGIT = rf"[A-Za-z0-9{_U}]"
_LABEL = rf"{_LETTER_DIGIT}(?:[A-Za-z0-9\-{_U}]*{_LETTER_DIGIT})?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_IPV4 = (
    r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}"
)
_GENERAL_LITERAL = r"[A-Za-z0-9\-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+"
_ADDRESS_LITERAL = rf"\[(?:{_IPV4}|IPv6:[0-9A-Fa-f:.]+|{_GENERAL_LITERAL})\]"
_MAILBOX = re.compile(
    rf"(?:{_DOT_STRING}|{_QUOTED_STRING})@(?:{_DOMAIN}|{_ADDRESS_LITERAL})\Z"
)
_SOURCE_ROUTE = re.compile(rf"@{_DOMAIN}(?:,@{_DOMAIN})*:")
# HELO names in the wild: Windows host names with underscores, FQDNs with the
# root dot.  Accepted (as Postfix does by default); the rest stays strict.
_HELO_LABEL = rf"[A-Za-z0-9_{_U}](?:[A-Za-z0-9_\-{_U}]*[A-Za-z0-9_{_U}])?"
_HELO_NAME = re.compile(
    rf"(?:{_HELO_LABEL}(?:\.{_HELO_LABEL})*\.?|{_ADDRESS_LITERAL})\Z"
)
#: the usual HELO names (ASCII labels, no literal), matched first: a
#: fraction of _HELO_NAME's cost (no non-ASCII classes, nothing to
#: backtrack into); it accepts only what _HELO_NAME accepts
_PP = "+" if sys.version_info >= (3, 11) else ""  # possessive, where it exists
_ASCII_HELO_LABEL = rf"[A-Za-z0-9_]+{_PP}(?:-+{_PP}[A-Za-z0-9_]+{_PP})*{_PP}"
_ASCII_HELO_NAME = re.compile(
    rf"{_ASCII_HELO_LABEL}(?:\.{_ASCII_HELO_LABEL})*{_PP}\.?\Z"
)
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*\Z")
_XTEXT_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256
#: a mailbox this long has no part over its own limit
_SHORTEST_LIMIT = min(MAX_LOCAL_PART, MAX_DOMAIN, MAX_PATH)


def parse_helo(argument: str) -> str:
    """The client's domain or address literal from HELO/EHLO.

    Lenient about what follows the name (some clients add text), about
    underscores and a trailing root dot (real clients send them); strict that
    a name is there and looks like a domain or literal.
    """
    name = argument.split(" ", 1)[0]
    if (
        not name
        or (_ASCII_HELO_NAME.match(name) is None and not _HELO_NAME.match(name))
        or len(name) > MAX_DOMAIN
    ):
        raise SMTPError(R501_SYNTAX_HELO)
    return name


def parse_address(text: str, *, allow_empty: bool) -> str:
    """Validate the inside of a path, without its angle brackets.

    Returns the mailbox with any source route dropped (RFC 5321 4.1.2 says
    servers must accept and ignore it).
    """
    if text == "":
        if allow_empty:
            return ""
        raise ValueError("empty path")
    route = _SOURCE_ROUTE.match(text)
    if route:
        text = text[route.end() :]
    if len(text) > MAX_PATH or not _MAILBOX.match(text):
        raise ValueError(f"bad mailbox {text!r}")
    local, _, domain = text.rpartition("@")
    if len(local) > MAX_LOCAL_PART or len(domain) > MAX_DOMAIN:
        raise ValueError(f"mailbox part too long {text!r}")
    return text


def _split_path(argument: str, prefix: str) -> tuple[str, str] | None:
    """C{"FROM:<a@b> SIZE=1"} -> C{("a@b", "SIZE=1")}; None on bad syntax."""
    if argument[: len(prefix)].upper() != prefix:
        return None
    rest = argument[len(prefix) :].lstrip(" ")
    if rest.startswith("<"):
        end = rest.find(">") if '"' not in rest else _closing_bracket(rest)
        if end < 0:
            return None
        path, params = rest[1:end], rest[end + 1 :]
        if params and not params.startswith(" "):
            return None
        return path, params.strip(" ")
    # Lenient: an address without brackets (seen from simple scripts).
    path, _, params = rest.partition(" ")
    if not path or path == "<>":
        return None
    return path, params.strip(" ")


def _closing_bracket(text: str) -> int:
    """Index of the '>' closing the path, skipping quoted local parts."""
    in_quotes = escaped = False
    for index in range(1, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif char == "\\" and in_quotes:
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            return index
    return -1


def parse_parameters(text: str) -> dict[str, str | None]:
    """ESMTP parameters: C{"SIZE=10 BODY=8BITMIME"} -> upper-case keys."""
    params: dict[str, str | None] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not _KEYWORD.match(key) or (sep and not _XTEXT_VALUE.match(value)):
            raise SMTPError(fill(R501_BAD_PARAMETER, name=key[:32] or "?"))
        params[key.upper()] = value if sep else None
    return params


def _is_ascii(text: str) -> bool:
    return text.isascii()


def _size(value: str | None) -> str | None:
    if value is None or not value.isdigit() or len(value) > 20:
        raise ValueError(value)
    return value


def _choice(*allowed: str) -> Callable[[str | None], str]:
    def check(value: str | None) -> str:
        if value is None or value.upper() not in allowed:
            raise ValueError(value)
        return value.upper()

    return check


def _flag(value: str | None) -> None:
    if value is not None:
        raise ValueError(value)


def _xtext(value: str | None) -> str:
    # parse_parameters already refused characters outside xtext.
    if not value or len(value) > 500:
        raise ValueError(value)
    return value


def _envid(value: str | None) -> str:
    if not value or len(value) > 100:  # RFC 3461 4.4
        raise ValueError(value)
    return value


_NOTIFY_EVENTS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def _notify(value: str | None) -> str:
    """RFC 3461 4.1: NEVER, or a list of SUCCESS, FAILURE, DELAY."""
    items = (value or "").upper().split(",")
    if items != ["NEVER"] and not (
        set(items) <= _NOTIFY_EVENTS and len(set(items)) == len(items)
    ):
        raise ValueError(value)
    return ",".join(items)


_ORCPT = re.compile(r"[A-Za-z0-9\-]+;[\x21-\x7e]+\Z")


def _orcpt(value: str | None) -> str:
    """RFC 3461 4.2: addr-type ";" xtext."""
    if not value or len(value) > 500 or not _ORCPT.match(value):
        raise ValueError(value)
    return value


#: MAIL parameters the server offers, each with its value check
MAIL_PARAMETERS: dict[str, Callable[[str | None], str | None]] = {
    "SIZE": _size,  # RFC 1870
    "BODY": _choice("7BIT", "8BITMIME"),  # RFC 6152
    "SMTPUTF8": _flag,  # RFC 6531
    "AUTH": _xtext,  # RFC 4954 5
    "RET": _choice("FULL", "HDRS"),  # RFC 3461 (DSN)
    "ENVID": _envid,
}
#: RCPT parameters the server offers (DSN, RFC 3461)
RCPT_PARAMETERS: dict[str, Callable[[str | None], str | None]] = {
    "NOTIFY": _notify,
    "ORCPT": _orcpt,
}
#: the same without DSN, for handlers that do not honour it (555 otherwise)
_MAIL_WITHOUT_DSN = {
    name: check
    for name, check in MAIL_PARAMETERS.items()
    if name not in ("RET", "ENVID")
}
_RCPT_WITHOUT_DSN: dict[str, Callable[[str | None], str | None]] = {}


def _check_parameters(
    params: dict[str, str | None],
    offered: dict[str, Callable[[str | None], str | None]],
) -> None:
    """Unknown parameters are 555; bad values 501; good ones are normalised."""
    for key, value in params.items():
        check = offered.get(key)
        if check is None:
            raise SMTPError(fill(R555_UNKNOWN_PARAMETER, name=key[:32]))
        try:
            params[key] = check(value)
        except ValueError:
            raise SMTPError(fill(R501_BAD_PARAMETER, name=key)) from None


# The common shapes, parsed in one match: C{FROM:<local@domain>} and
# C{TO:<local@domain>} with a dot-string local part and an ASCII domain, then
# nothing or a space and parameters.  What matches is exactly what the full
# parser would accept with the same result (the mailbox is a subset of
# L{_MAILBOX}, no source route, no quotes, ASCII so no SMTPUTF8 question);
# everything else, including every error, goes through the full parser.
# Each piece splits one way only (atoms between dots, letter-digit runs
# between hyphen runs), so nothing is worth backtracking into: on Python 3.11+
# the quantifiers are possessive, which makes the match about a third faster.
_P = "+" if sys.version_info >= (3, 11) else ""
_ASCII_ATEXT = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-]+{_P}"
_ASCII_LABEL = rf"[A-Za-z0-9]+{_P}(?:-+{_P}[A-Za-z0-9]+{_P})*{_P}"
_SIMPLE_MAILBOX = (
    rf"(({_ASCII_ATEXT}(?:\.{_ASCII_ATEXT})*{_P})"
    rf"@({_ASCII_LABEL}(?:\.{_ASCII_LABEL})*{_P}))"
)
_SIMPLE_MAIL = re.compile(rf"[Ff][Rr][Oo][Mm]:<(?:{_SIMPLE_MAILBOX})?>(?: (.*))?\Z")
_SIMPLE_RCPT = re.compile(rf"[Tt][Oo]:<{_SIMPLE_MAILBOX}>(?: (.*))?\Z")


def _over_limit(mailbox: str, local: str, domain: str) -> bool:
    """Whether a fast-path mailbox is over a length limit (the full parser
    then says which reply)."""
    return (
        len(mailbox) > MAX_PATH
        or len(local) > MAX_LOCAL_PART
        or len(domain) > MAX_DOMAIN
    )


def _checked_parameters(
    text: str, offered: dict[str, Callable[[str | None], str | None]]
) -> dict[str, str | None]:
    params = parse_parameters(text)
    _check_parameters(params, offered)
    return params


def parse_mail(argument: str, dsn: bool = True) -> tuple[str, dict[str, str | None]]:
    """The argument of MAIL: C{FROM:<reverse-path> [params]}.

    Returns the sender (C{""} for the null path) and the validated parameters.
    Without C{dsn}, RET and ENVID are unknown parameters (555).
    """
    match = _SIMPLE_MAIL.match(argument)
    if match is not None:
        mailbox, local, domain, param_text = match.groups()
        if mailbox is None:  # the null path <>
            mailbox = ""
        elif len(mailbox) > _SHORTEST_LIMIT and _over_limit(mailbox, local, domain):
            return _parse_mail_full(argument, dsn)
        if not param_text:
            return mailbox, {}
        offered = MAIL_PARAMETERS if dsn else _MAIL_WITHOUT_DSN
        return mailbox, _checked_parameters(param_text, offered)
    return _parse_mail_full(argument, dsn)


def _parse_mail_full(
    argument: str, dsn: bool = True
) -> tuple[str, dict[str, str | None]]:
    """L{parse_mail} for any argument: the reference the fast path agrees with."""
    split = _split_path(argument, "FROM:")
    if split is None:
        raise SMTPError(R501_SYNTAX_MAIL)
    path, param_text = split
    params = parse_parameters(param_text)
    _check_parameters(params, MAIL_PARAMETERS if dsn else _MAIL_WITHOUT_DSN)
    try:
        sender = parse_address(path, allow_empty=True)
    except ValueError:
        raise SMTPError(R501_BAD_SENDER) from None
    if not _is_ascii(sender) and "SMTPUTF8" not in params:
        raise SMTPError(R553_NEEDS_SMTPUTF8)
    return sender, params


def parse_rcpt(
    argument: str, smtputf8: bool, dsn: bool = True
) -> tuple[str, dict[str, str | None]]:
    """The argument of RCPT: C{TO:<forward-path> [params]}.

    C{<postmaster>} without a domain is accepted (RFC 5321 4.1.1.3).
    Without C{dsn}, NOTIFY and ORCPT are unknown parameters (555).
    """
    match = _SIMPLE_RCPT.match(argument)
    if match is not None:
        mailbox, local, domain, param_text = match.groups()
        if len(mailbox) > _SHORTEST_LIMIT and _over_limit(mailbox, local, domain):
            return _parse_rcpt_full(argument, smtputf8, dsn)
        if not param_text:
            return mailbox, {}
        offered = RCPT_PARAMETERS if dsn else _RCPT_WITHOUT_DSN
        return mailbox, _checked_parameters(param_text, offered)
    return _parse_rcpt_full(argument, smtputf8, dsn)


def _parse_rcpt_full(
    argument: str, smtputf8: bool, dsn: bool = True
) -> tuple[str, dict[str, str | None]]:
    """L{parse_rcpt} for any argument: the reference the fast path agrees with."""
    split = _split_path(argument, "TO:")
    if split is None:
        raise SMTPError(R501_SYNTAX_RCPT)
    path, param_text = split
    params = parse_parameters(param_text)
    _check_parameters(params, RCPT_PARAMETERS if dsn else _RCPT_WITHOUT_DSN)
    if path.lower() == "postmaster":
        return path, params
    try:
        recipient = parse_address(path, allow_empty=False)
    except ValueError:
        raise SMTPError(R501_BAD_RECIPIENT) from None
    if not smtputf8 and not _is_ascii(recipient):
        raise SMTPError(R553_NEEDS_SMTPUTF8)
    return recipient, params
