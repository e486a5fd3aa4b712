# -*- test-case-name: tests.test_replies -*-
"""
The reply table: every reply the server sends is a constant here.

Handlers raise L{SMTPError} to send a reply of their choice; the server never
writes a reply code that is not built from a L{Reply}.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Reply",
    "SMTPError",
    "format_reply",
    "fill",
    "queued_reply",
    "queued_wire",
]


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: a code, an RFC 3463 enhanced status code and text.

    Args:
        code: the three-digit reply code.
        enhanced: ``"x.y.z"``, or ``""`` for replies that never carry one
            (the greeting, EHLO lines).
        text: human-readable text; ``"\\n"`` separates lines of a multi-line reply.
    """

    code: int
    enhanced: str
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code out of range: {self.code!r}")
        if self.enhanced:
            klass = self.enhanced.partition(".")[0]
            if klass != str(self.code)[0] or self.enhanced.count(".") != 2:
                raise ValueError(
                    f"enhanced status {self.enhanced!r} does not fit code {self.code}"
                )

    def encoded(self, enhanced: bool) -> bytes:
        """L{format_reply}, computed once per reply and kept (the hot path).

        Kept in the instance's C{_wire_enhanced} or C{_wire} (the protocol
        reads them there first, saving the call).
        """
        key = "_wire_enhanced" if enhanced else "_wire"
        data = self.__dict__.get(key)
        if data is None:
            data = self.__dict__[key] = format_reply(self, enhanced)
        return data

    def with_text(self, text: str) -> Reply:
        """The same reply with other text."""
        return _same_codes(self, text)


def format_reply(reply: Reply, enhanced: bool) -> bytes:
    """Encode C{reply} for the wire, multi-line aware.

    Args:
        reply: what to send.
        enhanced: whether to print the enhanced status code (after EHLO).
    """
    prefix = f"{reply.enhanced} " if enhanced and reply.enhanced else ""
    if "\n" not in reply.text:
        line = f"{reply.code} {prefix}{reply.text}\r\n"
        return line.encode("utf-8", "surrogateescape")
    lines = reply.text.split("\n")
    last = len(lines) - 1
    out = [
        f"{reply.code}{' ' if i == last else '-'}{prefix}{line}\r\n"
        for i, line in enumerate(lines)
    ]
    return "".join(out).encode("utf-8", "surrogateescape")


def fill(reply: Reply, **values: object) -> Reply:
    """C{reply} with its C{{placeholders}} filled from C{values}."""
    return _same_codes(reply, reply.text.format(**values))


def _same_codes(reply: Reply, text: str) -> Reply:
    """A L{Reply} with C{reply}'s codes, already checked, and C{text}.

    Skips the dataclass's C{__init__} and C{__post_init__} (a quarter of the
    cost of the 250 after each message): the codes are a checked pair.
    """
    new = object.__new__(Reply)
    fields = new.__dict__
    fields["code"] = reply.code
    fields["enhanced"] = reply.enhanced
    fields["text"] = text
    return new


def queued_reply(queue_id: str) -> Reply:
    """C{fill(R250_QUEUED, queue_id=queue_id)}, made for once per message.

    The text is joined rather than formatted and both wire forms are joined
    from bytes made once, so L{Reply.encoded} finds them: a third of the cost
    of the general path.
    """
    if "\n" in queue_id:  # (never from the server: safe_queue_id drops it)
        return fill(R250_QUEUED, queue_id=queue_id)
    reply = object.__new__(Reply)
    tail = queue_id.encode("utf-8", "surrogateescape") + b"\r\n"
    fields = reply.__dict__
    fields["code"] = R250_QUEUED.code
    fields["enhanced"] = R250_QUEUED.enhanced
    fields["text"] = _QUEUED_TEXT + queue_id
    fields["_wire"] = _QUEUED_WIRE + tail
    fields["_wire_enhanced"] = _QUEUED_WIRE_ENHANCED + tail
    return reply


def queued_wire(queue_id: str, enhanced: bool) -> bytes:
    """C{queued_reply(queue_id).encoded(enhanced)}, without the L{Reply}.

    The protocol's answer to a stored message when nothing needs the reply
    object (no C{--debug}): one concatenation instead of a reply and both of
    its wire forms.
    """
    if "\n" in queue_id:  # (never from the server: safe_queue_id drops it)
        return queued_reply(queue_id).encoded(enhanced)
    head = _QUEUED_WIRE_ENHANCED if enhanced else _QUEUED_WIRE
    return head + queue_id.encode("utf-8", "surrogateescape") + b"\r\n"


class SMTPError(Exception):
    """Raised by handlers (and the core) to answer with a specific reply.

    ``SMTPError(550, "5.7.1", "Spam is not welcome here")`` or
    ``SMTPError(R550_MAILBOX_UNAVAILABLE)``.
    """

    reply: Reply

    def __init__(
        self, code: int | Reply, enhanced: str = "", text: str | None = None
    ) -> None:
        if isinstance(code, Reply):
            reply = code if text is None else code.with_text(text)
        else:
            if text is None:
                text = "Requested action not taken"
            reply = Reply(code, enhanced, text)
        super().__init__(reply.code, reply.enhanced, reply.text)
        self.reply = reply

    def __str__(self) -> str:
        return f"{self.reply.code} {self.reply.enhanced} {self.reply.text}".replace(
            "  ", " "
        )


# Greeting and session --------------------------------------------------------
#: filled per session with what it can use (see SMTPServerProtocol.do_HELP)
R214_HELP = Reply(214, "2.0.0", "Commands: {commands}")
R220_READY = Reply(220, "", "{hostname} ESMTP {app} ready")
R220_LMTP_READY = Reply(220, "", "{hostname} LMTP {app} ready")
R220_STARTTLS = Reply(220, "2.0.0", "Ready to start TLS")
R221_BYE = Reply(221, "2.0.0", "Bye")
R235_AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
R250_OK = Reply(250, "2.0.0", "OK")
R250_SENDER_OK = Reply(250, "2.1.0", "Sender OK")
R250_RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
R250_QUEUED = Reply(250, "2.0.0", "OK: queued as {queue_id}")
# queued_reply's pieces: R250_QUEUED with the queue id left off.
_QUEUED_TEXT = R250_QUEUED.text.replace("{queue_id}", "")
_QUEUED_WIRE = format_reply(R250_QUEUED.with_text(_QUEUED_TEXT), False)[:-2]
_QUEUED_WIRE_ENHANCED = format_reply(R250_QUEUED.with_text(_QUEUED_TEXT), True)[:-2]
assert R250_QUEUED.text == _QUEUED_TEXT + "{queue_id}"
#: LMTP: one recipient's reply after the data (RFC 2033 section 4.2)
R250_RECIPIENT_QUEUED = Reply(250, "2.0.0", "<{recipient}> OK: queued as {queue_id}")
R250_RECIPIENT_DELIVERED = Reply(250, "2.0.0", "<{recipient}> OK: delivered")
R250_RESET = Reply(250, "2.0.0", "Reset OK")
R250_CHUNK_OK = Reply(250, "2.0.0", "{size} octets received")
R252_CANNOT_VRFY = Reply(
    252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery"
)
R334_CHALLENGE = Reply(334, "", "{challenge}")
R354_START_INPUT = Reply(354, "", "End data with <CR><LF>.<CR><LF>")

# Transient failures ----------------------------------------------------------
R421_TIMEOUT = Reply(421, "4.4.2", "{hostname} Timeout, closing connection")
R421_SESSION_TOO_LONG = Reply(
    421, "4.4.2", "{hostname} Session time limit reached, closing connection"
)
R421_TOO_MANY_ERRORS = Reply(
    421, "4.7.0", "{hostname} Too many errors, closing connection"
)
R421_SHUTTING_DOWN = Reply(
    421, "4.3.2", "{hostname} Service shutting down, closing connection"
)
R421_TOO_MANY_CONNECTIONS = Reply(
    421, "4.7.0", "{hostname} Too many connections, try again later"
)
R421_AUTH_FAILURES = Reply(
    421, "4.7.0", "{hostname} Too many authentication failures, closing connection"
)
R451_LOCAL_ERROR = Reply(451, "4.3.0", "Requested action aborted: local error")
#: a handler hook passed Limits.handler_timeout
R451_HANDLER_TIMEOUT = Reply(
    451, "4.3.0", "Requested action aborted: handler timed out"
)
R421_HANDLER_TIMEOUT = Reply(
    421, "4.3.0", "{hostname} Service not available, closing transmission channel"
)
R452_TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
R452_INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
R454_AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure")

# Permanent failures ----------------------------------------------------------
R500_UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command not recognized")
#: EHLO or HELO to an LMTP server (RFC 2033 4.1)
R500_USE_LHLO = Reply(500, "5.5.1", "This is an LMTP server: use LHLO")
R500_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
R500_AUTH_LINE_TOO_LONG = Reply(
    500, "5.5.6", "Authentication exchange line is too long"
)
R501_SYNTAX_HELO = Reply(501, "5.5.4", "Syntax: HELO/EHLO domain")
R501_SYNTAX_MAIL = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
R501_SYNTAX_RCPT = Reply(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
R501_BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
R501_BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
R501_NO_ARGUMENTS = Reply(501, "5.5.4", "Syntax: {verb} takes no arguments")
R501_SYNTAX_VRFY = Reply(501, "5.5.4", "Syntax: VRFY address")
R501_BAD_PARAMETER = Reply(501, "5.5.4", "Bad value for parameter {name}")
R501_AUTH_BASE64 = Reply(501, "5.5.2", "Cannot decode base64 data")
R501_AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
R501_SYNTAX_AUTH = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
R501_SYNTAX_BDAT = Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
R502_NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
R503_HELO_FIRST = Reply(503, "5.5.1", "Send HELO/EHLO first")
R503_NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
R503_MAIL_FIRST = Reply(503, "5.5.1", "Need MAIL before {verb}")
R503_RCPT_FIRST = Reply(503, "5.5.1", "Need RCPT before DATA")
R503_IN_BDAT = Reply(503, "5.5.1", "{verb} not allowed during BDAT")
R503_IN_TRANSACTION = Reply(
    503, "5.5.1", "{verb} not allowed during a mail transaction"
)
R503_ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")
R503_ALREADY_AUTH = Reply(503, "5.5.1", "Already authenticated")
R504_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
R530_TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
R530_AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
R535_AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
R538_AUTH_NEEDS_TLS = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
R550_MAILBOX_UNAVAILABLE = Reply(550, "5.1.1", "Mailbox unavailable")
R552_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
R553_NEEDS_SMTPUTF8 = Reply(
    553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter"
)
R554_TRANSACTION_FAILED = Reply(554, "5.0.0", "Transaction failed")
R555_UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Parameter {name} not recognized")
R250_HELO = Reply(250, "", "{hostname} Hello {name}")

# XCLIENT (Postfix XCLIENT_README) and the AUTH failure limit -----------------
R501_SYNTAX_XCLIENT = Reply(501, "5.5.4", "Syntax: XCLIENT attribute=value...")
R501_XCLIENT_EXPECTED = Reply(501, "5.5.4", "XCLIENT attribute=value expected")
R501_XCLIENT_TOO_LONG = Reply(501, "5.5.4", "XCLIENT attribute value too long")
R501_XCLIENT_NAME = Reply(501, "5.5.4", "Bad XCLIENT attribute name: {name}")
R501_XCLIENT_VALUE = Reply(501, "5.5.4", "Bad {name} syntax: {value}")
R550_XCLIENT_DENIED = Reply(550, "5.7.0", "XCLIENT: insufficient authorization")
R454_AUTH_RATE_LIMITED = Reply(
    454, "4.7.0", "Too many failed authentications from your address, try later"
)
R421_AUTH_RATE_LIMITED = Reply(
    421,
    "4.7.0",
    "{hostname} Too many failed authentications from your address, try later",
)
