# -*- test-case-name: tests.test_sanitize -*-
"""
Handler output on its way to the wire: make it safe, say what changed.

A handler's L{SMTPError} text and the queue id its receiver returns are
written into replies.  Unchecked, a bare CR smuggles a second reply
(C{550 5.7.1 refused\\r250 2.0.0 fake}), a megabyte of text makes one reply
line, and C{bytes} print as C{b'...'}.  RFC 5321 4.5.3.1.5 bounds a reply
line at 512 octets with its code and CRLF.  These functions are pure: they
return the safe value and a list of what they changed, for the log.
"""

from __future__ import annotations

from .replies import R451_LOCAL_ERROR, Reply

__all__ = [
    "MAX_QUEUE_ID",
    "MAX_REPLY_LINES",
    "MAX_TEXT_LINE",
    "safe_queue_id",
    "safe_reply",
]

#: characters of one reply line's text (512 less code, enhanced code, CRLF)
MAX_TEXT_LINE = 400
#: lines of one reply (a handler's multi-line 5xx with an explanation)
MAX_REPLY_LINES = 10
#: characters of a queue id ("250 2.0.0 OK: queued as " takes 24)
MAX_QUEUE_ID = 200

_ELLIPSIS = "..."


def _printable(text: str) -> tuple[str, int]:
    """C{text} with every character but printable ASCII made C{?}; how many."""
    out = []
    replaced = 0
    for char in text:
        if " " <= char <= "~":
            out.append(char)
        else:
            out.append("?")
            replaced += 1
    return "".join(out), replaced


def _bounded(text: str, limit: int) -> tuple[str, bool]:
    if len(text) <= limit:
        return text, False
    return text[: limit - len(_ELLIPSIS)] + _ELLIPSIS, True


def safe_reply(reply: Reply) -> tuple[Reply, list[str]]:
    """A handler's refusal as it may go on the wire, and what was changed.

    C{"\\n"} stays the line break of a multi-line reply (each line gets its
    own code); CR, NUL, other control and non-ASCII characters become C{?};
    lines and their number are bounded.  A refusal must refuse: a code below
    400 becomes C{451 4.3.0}, since the server has not done what a 2xx or
    3xx would tell the client.
    """
    changes: list[str] = []
    if reply.code < 400:
        changes.append(f"code {reply.code} is not a refusal: sent 451 4.3.0")
        return R451_LOCAL_ERROR, changes
    text = reply.text
    if len(text) <= MAX_TEXT_LINE and text.isascii() and text.isprintable():
        return reply, changes  # the usual case: one line of plain text
    lines = reply.text.replace("\r\n", "\n").split("\n")
    if len(lines) > MAX_REPLY_LINES:
        changes.append(f"{len(lines)} lines cut to {MAX_REPLY_LINES}")
        lines = lines[:MAX_REPLY_LINES]
    replaced_total = 0
    cut = 0
    safe_lines = []
    for line in lines:
        line, replaced = _printable(line)
        line, was_cut = _bounded(line, MAX_TEXT_LINE)
        replaced_total += replaced
        cut += was_cut
        safe_lines.append(line)
    if replaced_total:
        changes.append(
            f"{replaced_total} control or non-ASCII characters replaced by '?'"
        )
    if cut:
        changes.append(f"{cut} lines longer than {MAX_TEXT_LINE} characters cut")
    text = "\n".join(safe_lines)
    if text == reply.text:
        return reply, changes
    return reply.with_text(text), changes


def safe_queue_id(value: object) -> tuple[str, list[str]]:
    """A queue id as it may go into C{250 ... queued as ID}, and what changed.

    Text, printable ASCII without spaces, at most L{MAX_QUEUE_ID} characters.
    C{bytes} are decoded (ASCII, undecodable bytes become C{?}).
    """
    if (
        type(value) is str
        and len(value) <= MAX_QUEUE_ID
        and value.isascii()
        and value.isprintable()
        and " " not in value
    ):
        return value, []  # the usual case
    changes: list[str] = []
    if isinstance(value, bytes):
        changes.append("bytes decoded")
        text = value.decode("ascii", "replace").replace("\ufffd", "?")
    elif isinstance(value, str):
        text = value
    else:
        changes.append(f"{type(value).__name__} made text")
        text = str(value)
    text, replaced = _printable(text)
    if " " in text:
        replaced += text.count(" ")
        text = text.replace(" ", "?")
    if replaced:
        changes.append(
            f"{replaced} space, control or non-ASCII characters replaced by '?'"
        )
    text, cut = _bounded(text, MAX_QUEUE_ID)
    if cut:
        changes.append(f"cut to {MAX_QUEUE_ID} characters")
    return text, changes
