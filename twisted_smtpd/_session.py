# -*- test-case-name: tests.test_session -*-
"""
The SMTP session as a pure state machine.

Rule: everything that decides whether a command may run now lives in this
file — the L{ALLOWED} table and the gates for TLS and AUTH.  The protocol asks
L{Session.check} and sends the reply it gets, or runs the command.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Callable, Optional

from .replies import (
    R421_TOO_MANY_ERRORS,
    R452_TOO_MANY_RECIPIENTS,
    R503_HELO_FIRST,
    R503_IN_BDAT,
    R503_IN_TRANSACTION,
    R503_MAIL_FIRST,
    R503_NESTED_MAIL,
    R503_RCPT_FIRST,
    R530_AUTH_REQUIRED,
    R530_TLS_REQUIRED,
    R552_TOO_BIG,
    Reply,
    SMTPError,
    fill,
)

__all__ = [
    "State",
    "ALLOWED",
    "Limits",
    "Envelope",
    "TLSInfo",
    "Session",
    "received_header",
]


class State(enum.Enum):
    """Where a session is.  DATA is the body being read in raw mode."""

    CONNECTED = "connected"  # greeting sent, no HELO/EHLO yet
    GREETED = "greeted"  # HELO/EHLO done, no transaction
    MAIL = "mail"  # MAIL accepted
    RCPT = "rcpt"  # at least one RCPT accepted
    DATA = "data"  # reading the message
    CHUNKING = "chunking"  # between BDAT chunks of a message (RFC 3030)

    # Members are singletons compared by identity: hash them the same way
    # (Enum's own __hash__ is Python code, run per command for ALLOWED).
    __hash__ = object.__hash__


_ANYTIME = frozenset({"NOOP", "QUIT", "RSET", "HELO", "EHLO", "VRFY", "HELP", "EXPN"})

#: which verbs may run in each state; anything else gets the 503 of L{_REFUSED}
ALLOWED: dict[State, frozenset[str]] = {
    State.CONNECTED: _ANYTIME | {"STARTTLS", "XCLIENT"},
    State.GREETED: _ANYTIME | {"STARTTLS", "AUTH", "MAIL", "XCLIENT"},
    State.MAIL: _ANYTIME | {"RCPT"},
    State.RCPT: _ANYTIME | {"RCPT", "DATA", "BDAT"},
    State.DATA: frozenset(),
    State.CHUNKING: frozenset({"BDAT", "RSET", "NOOP", "QUIT", "HELO", "EHLO"}),
}


#: the 503 for a known verb at the wrong time, by (state, verb)
def _refusal(state: State, verb: str) -> Reply:
    if state is State.CONNECTED:
        return R503_HELO_FIRST
    if state is State.CHUNKING:
        return fill(R503_IN_BDAT, verb=verb)
    if verb == "MAIL":
        return R503_NESTED_MAIL
    if verb in ("RCPT", "DATA", "BDAT") and state is State.GREETED:
        return fill(R503_MAIL_FIRST, verb=verb)
    if verb == "DATA":
        return R503_RCPT_FIRST
    if verb == "BDAT":
        return R503_RCPT_FIRST.with_text("Need RCPT before BDAT")
    return fill(R503_IN_TRANSACTION, verb=verb)


#: verbs the server knows; others are 500
KNOWN_VERBS = frozenset(
    {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP"}
    | {"STARTTLS", "AUTH", "EXPN", "BDAT", "XCLIENT"}
)
#: allowed before STARTTLS when TLS is required (RFC 3207 4)
BEFORE_TLS = frozenset(
    {"NOOP", "EHLO", "HELO", "LHLO", "STARTTLS", "QUIT", "RSET", "XCLIENT"}
)
#: allowed before AUTH when AUTH is required (RFC 4954 6)
BEFORE_AUTH = frozenset(
    {
        "NOOP",
        "EHLO",
        "HELO",
        "LHLO",
        "STARTTLS",
        "QUIT",
        "RSET",
        "AUTH",
        "HELP",
        "XCLIENT",
    }
)


@dataclass(frozen=True)
class Limits:
    """Resource limits, enforced by the core and advertised where RFCs say so.

    Args:
        max_message_size: bytes after unstuffing, advertised as C{SIZE};
            C{0} means no limit.
        max_recipients: RCPTs per transaction (then 452 4.5.3).
        max_command_line: octets of a command line with its CRLF (RFC 5321
            4.5.3.1.4); MAIL and RCPT get room for parameters.
        max_auth_line: octets of an AUTH line or SASL response (RFC 4954 4).
        max_bad_commands: unknown, malformed or out-of-sequence commands
            before the session is closed with 421.
        timeout: idle seconds before 421 4.4.2 and close.
        line_timeout: seconds a command line may take from its first byte to
            its CRLF (bounds clients that drip bytes to dodge the idle timer).
        data_timeout: seconds the whole DATA phase may take.
        tls_handshake_timeout: seconds a TLS handshake (after STARTTLS, or
            from connect on an C{ssl:} listener) may take; then the
            connection is aborted.
        max_session_time: seconds a session may last in all; then 421 4.4.2
            and close, whatever it is doing (0 = no limit).
        max_junk_commands: NOOP, VRFY, RSET, HELP, EXPN and empty BDAT
            chunks allowed without a delivered message in between; each one
            past it counts as a bad command (Postfix's
            C{smtpd_junk_command_limit}).
        max_connections: concurrent sessions per factory (0 = no limit).
        max_connections_per_ip: concurrent sessions per client address.
        handler_timeout: seconds a handler hook may take (check_client,
            check_sender, check_recipient, the end of a message) before it
            is cancelled and answered 451 4.3.0; C{0} means no deadline.
    """

    max_message_size: int = 33_554_432
    max_recipients: int = 100
    max_command_line: int = 512
    max_parameter_line: int = 1024
    max_auth_line: int = 12_288
    max_bad_commands: int = 10
    timeout: float = 300.0
    line_timeout: float = 300.0
    data_timeout: float = 1800.0
    tls_handshake_timeout: float = 60.0
    max_session_time: float = 3600.0
    max_junk_commands: int = 100
    max_connections: int = 0
    max_connections_per_ip: int = 0
    handler_timeout: float = 120.0

    def line_limit(self, verb: str) -> int:
        """The longest line, CRLF included, allowed for C{verb}."""
        return self._line_limits.get(verb, self.max_command_line)

    @functools.cached_property
    def _line_limits(self) -> dict[str, int]:
        return {
            "MAIL": self.max_parameter_line,
            "RCPT": self.max_parameter_line,
            "AUTH": self.max_auth_line,
        }

    @functools.cached_property
    def shortest_line(self) -> int:
        """No verb's line limit is under this: a line within it needs no lookup."""
        return min(self.max_command_line, *self._line_limits.values())

    @functools.cached_property
    def max_line(self) -> int:
        """The longest line the reader must buffer before giving up on it."""
        return max(self.max_command_line, self.max_parameter_line, self.max_auth_line)


@dataclass(frozen=True)
class TLSInfo:
    """Facts about the TLS layer of a session."""

    protocol: str
    cipher: str
    peer_certificate: Any = None  # a cryptography x509.Certificate, or None


@dataclass
class Envelope:
    """One mail transaction, handed to handlers.

    C{content} holds the whole message (CRLF line endings, dot-unstuffed) for
    handlers that take it whole; streaming receivers get the bytes instead and
    C{content} stays empty.  C{size} is the message size in both cases.
    """

    session_id: str
    peer: Any
    helo: str
    esmtp: bool
    tls: Optional[TLSInfo]
    auth: Any
    #: the client's forward-confirmed reverse-DNS name, C{"unknown"} if it
    #: has none, C{None} when reverse DNS is off
    peer_name: Optional[str] = None
    mail_from: str = ""
    mail_options: dict[str, Optional[str]] = field(default_factory=dict)
    rcpt_tos: list[str] = field(default_factory=list)
    rcpt_options: list[dict[str, Optional[str]]] = field(default_factory=list)
    content: bytes = b""
    size: int = 0
    message_id: str = ""
    #: when DATA began (reactor seconds); the date of the Received: header
    received_at: float = 0.0
    #: the session is LMTP (RFC 2033): one reply per recipient after the data
    lmtp: bool = False
    # Builds the Received: header on first use: most handlers never read it.
    _trace_builder: Optional[Callable[[Envelope], bytes]] = field(
        default=None, repr=False, compare=False
    )
    _trace: Optional[bytes] = field(default=None, repr=False, compare=False)

    @property
    def received_header(self) -> bytes:
        """The C{Received:} trace field the server made for this message."""
        if self._trace is None:
            builder = self._trace_builder
            self._trace = builder(self) if builder is not None else b""
        return self._trace

    @received_header.setter
    def received_header(self, value: bytes) -> None:
        self._trace = value

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.mail_options

    @property
    def protocol_name(self) -> str:
        """The C{with} keyword of the Received header (RFC 3848, 6531)."""
        if self.lmtp:
            name = "UTF8LMTP" if self.smtputf8 else "LMTP"
        elif not self.esmtp:
            return "SMTP"
        else:
            name = "UTF8SMTP" if self.smtputf8 else "ESMTP"
        if self.tls is not None:
            name += "S"
        if self.auth is not None:
            name += "A"
        return name


_new_object = object.__new__


def _new_envelope(
    session: Session, mail_from: str, mail_options: dict[str, Optional[str]]
) -> Envelope:
    """C{Envelope(...)} for a new transaction, every field stored in order.

    Once per transaction: the stores alone cost two thirds of the dataclass
    C{__init__} called through the type (0.28 against 0.40 us), and the
    instance is the same, C{vars()} included (tests/test_session.py checks it
    against a keyword-built envelope, so a new field can't be forgotten).
    """
    envelope: Envelope = _new_object(Envelope)
    envelope.session_id = session.session_id
    envelope.peer = session.peer
    envelope.helo = session.helo
    envelope.esmtp = session.esmtp
    envelope.tls = session.tls
    envelope.auth = session.auth
    envelope.peer_name = session.peer_name
    envelope.mail_from = mail_from
    envelope.mail_options = mail_options
    envelope.rcpt_tos = []
    envelope.rcpt_options = []
    envelope.content = b""
    envelope.size = 0
    envelope.message_id = ""
    envelope.received_at = 0.0
    envelope.lmtp = session.lmtp
    envelope._trace_builder = None
    envelope._trace = None
    return envelope


class Session:
    """The state of one SMTP connection, without any I/O.

    Args:
        session_id: a short unique id for logs and queue ids.
        peer: the client's address.
        limits: the L{Limits} in force.
        tls_info: set when the connection is TLS from the start (C{ssl:}).
        tls_required: refuse most commands before STARTTLS.
        auth_required: refuse MAIL before AUTH.
        lmtp: the session speaks LMTP (its envelopes say so).
    """

    # Class defaults: a new session (one per connection) stores only what
    # differs, which is cheaper to build and smaller while idle.
    state = State.CONNECTED
    helo = ""
    esmtp = False
    auth: Any = None
    bad_commands = 0
    junk_commands = 0
    auth_failures = 0
    messages = 0
    envelope: Optional[Envelope] = None
    #: see L{Envelope.peer_name}; set when the lookup (or XCLIENT) answers
    peer_name: Optional[str] = None
    #: the client may send XCLIENT (and EHLO advertises it)
    xclient_allowed = False
    tls: Optional[TLSInfo] = None
    tls_required = False
    auth_required = False
    lmtp = False

    def __init__(
        self,
        session_id: str,
        peer: Any,
        limits: Limits,
        *,
        tls_info: Optional[TLSInfo] = None,
        tls_required: bool = False,
        auth_required: bool = False,
        lmtp: bool = False,
    ) -> None:
        self.session_id = session_id
        self.peer = peer
        self.limits = limits
        # Only what differs from the class defaults (one Session per connection).
        if tls_info is not None:
            self.tls = tls_info
        if tls_required:
            self.tls_required = True
        if auth_required:
            self.auth_required = True
        if lmtp:
            self.lmtp = True

    # -- gates -----------------------------------------------------------------
    def check(self, verb: str) -> Optional[Reply]:
        """The refusal for C{verb} now, or None if it may run.

        A verb a protocol subclass adds (not in L{KNOWN_VERBS}) may run in
        any state but inside a BDAT message, behind the same TLS and AUTH
        gates as MAIL.
        """
        if self.tls_required and self.tls is None and verb not in BEFORE_TLS:
            return R530_TLS_REQUIRED
        if verb not in ALLOWED[self.state] and (
            verb in KNOWN_VERBS or self.state is State.CHUNKING
        ):
            return _refusal(self.state, verb)
        if self.auth_required and self.auth is None and verb not in BEFORE_AUTH:
            return R530_AUTH_REQUIRED
        return None

    def bad_command(self) -> Optional[Reply]:
        """Count an error; the 421 to close with once over budget, else None."""
        self.bad_commands += 1
        if self.bad_commands >= self.limits.max_bad_commands:
            return R421_TOO_MANY_ERRORS
        return None

    def junk_command(self) -> Optional[Reply]:
        """Count a command that moves no mail; past the junk budget it is bad."""
        self.junk_commands += 1
        if self.junk_commands > self.limits.max_junk_commands:
            return self.bad_command()
        return None

    # -- transitions -----------------------------------------------------------
    def greeted(self, name: str, esmtp: bool) -> None:
        """HELO/EHLO: a new greeting also aborts any transaction."""
        self.helo = name
        self.esmtp = esmtp
        self.envelope = None
        self.state = State.GREETED

    def reset(self) -> None:
        """RSET or end of a transaction: keep the greeting, drop the envelope."""
        self.envelope = None
        if self.state is not State.CONNECTED:
            self.state = State.GREETED

    def tls_started(self, info: TLSInfo) -> None:
        """After STARTTLS: forget everything learnt in plaintext (RFC 3207 4.2)."""
        self.tls = info
        self.helo = ""
        self.esmtp = False
        self.auth = None
        self.envelope = None
        self.state = State.CONNECTED

    def xclient(self, helo: Optional[str], esmtp: bool, login: Optional[str]) -> None:
        """XCLIENT accepted: back to the greeting stage (Postfix XCLIENT_README).

        TLS stays.  A HELO (and PROTO) or LOGIN sent with XCLIENT is kept, as
        if the forwarded client had greeted or logged in itself.
        """
        self.envelope = None
        self.auth = login or None
        if helo:
            self.greeted(helo, esmtp)
        else:
            self.helo = ""
            self.esmtp = False
            self.state = State.CONNECTED

    def authenticated(self, identity: Any) -> None:
        self.auth = identity

    def check_size(self, params: dict[str, Optional[str]]) -> None:
        """MAIL SIZE= over the limit -> 552 5.3.4 (RFC 1870)."""
        declared = params.get("SIZE")
        limit = self.limits.max_message_size
        if declared is not None and limit and int(declared) > limit:
            raise SMTPError(R552_TOO_BIG)

    def new_envelope(
        self,
        mail_from: str = "",
        mail_options: Optional[dict[str, Optional[str]]] = None,
    ) -> Envelope:
        return _new_envelope(
            self, mail_from, {} if mail_options is None else mail_options
        )

    def begin(self, sender: str, params: dict[str, Optional[str]]) -> Envelope:
        """MAIL: the envelope to show the C{check_sender} hook (not yet open).

        Raises L{SMTPError} (552) if the declared SIZE is over the limit.
        """
        if params:
            self.check_size(params)
        return self.new_envelope(sender, params)

    def mail(self, envelope: Envelope) -> None:
        """MAIL accepted: C{envelope} is the open transaction."""
        self.envelope = envelope
        self.state = State.MAIL

    def check_recipient_count(self) -> None:
        assert self.envelope is not None
        if len(self.envelope.rcpt_tos) >= self.limits.max_recipients:
            raise SMTPError(R452_TOO_MANY_RECIPIENTS)

    def rcpt(self, address: str, params: dict[str, Optional[str]]) -> None:
        assert self.envelope is not None
        self.envelope.rcpt_tos.append(address)
        self.envelope.rcpt_options.append(params)
        self.state = State.RCPT

    def start_data(
        self,
        chunked: bool = False,
        received_at: float = 0.0,
        trace: Optional[Callable[[Envelope], bytes]] = None,
    ) -> Envelope:
        """DATA (or the first BDAT): the message begins.

        Args:
            chunked: BDAT rather than DATA.
            received_at: now, in reactor seconds (the Received: date).
            trace: builds the Received: header when a handler asks for it.
        """
        envelope = self.envelope
        assert envelope is not None
        self.state = State.CHUNKING if chunked else State.DATA
        self.messages += 1
        envelope.message_id = f"{self.session_id}-{self.messages}"
        envelope.received_at = received_at
        envelope._trace_builder = trace
        return envelope

    def message_done(self) -> None:
        """The message ended (stored, refused, too big or aborted)."""
        self.envelope = None
        self.state = State.GREETED


@functools.lru_cache(maxsize=4)
def _rfc5322_date(seconds: int) -> str:
    """The date for Received: headers; formatted once per second, not per message."""
    return formatdate(seconds, localtime=True)


def received_header(
    envelope: Envelope, hostname: str, app_name: str, when: float
) -> bytes:
    """The C{Received:} trace field for a message (RFC 5321 4.4)."""
    peer = envelope.peer
    ip = getattr(peer, "host", None)
    if ip:
        literal = f"IPv6:{ip}" if ":" in ip else ip
        source = f"[{literal}]"
    else:
        # A Unix socket (or another local transport): no address to give.
        source = "localhost"
    tls = envelope.tls
    name = f"{envelope.peer_name} " if envelope.peer_name else ""
    lines = [f"Received: from {envelope.helo or 'unknown'} ({name}{source})"]
    if tls is not None and tls.protocol:
        lines.append(f"\t(using {tls.protocol} with cipher {tls.cipher})")
    lines.append(
        f"\tby {hostname} ({app_name}) with {envelope.protocol_name}"
        f" id {envelope.message_id}"
    )
    if len(envelope.rcpt_tos) == 1:
        lines.append(f"\tfor <{envelope.rcpt_tos[0]}>")
    lines[-1] += f"; {_rfc5322_date(int(when))}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
