# -*- test-case-name: tests.test_web_message -*-
"""
Pure message parsing for the catcher: raw bytes in, Mailpit-shaped values out.

Nothing here touches Twisted or the disk; the store runs it in its thread.
"""

from __future__ import annotations

import base64
import email.policy
import hashlib
import html
import re
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesParser
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any, Optional

__all__ = [
    "Part",
    "ParsedMessage",
    "parse_message",
    "message_id_for",
    "addresses",
    "html_to_text",
]

#: how much body text the search index keeps per message
SEARCH_TEXT_LIMIT = 64 * 1024
#: Mailpit's snippet length
SNIPPET_LENGTH = 250

_parser = BytesParser(policy=email.policy.default)


def message_id_for(name: str) -> str:
    """A stable 22-character ID for a stored message (from its file name).

    Mailpit's IDs are opaque 22-character strings; clients only pass them back.
    """
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()
    return base64.urlsafe_b64encode(digest[:16]).decode("ascii").rstrip("=")


def addresses(values: list[str]) -> list[dict[str, str]]:
    """Header values to Mailpit's C{[{"Name": ..., "Address": ...}]}."""
    result = []
    for name, address in getaddresses([str(v) for v in values]):
        if name or address:
            result.append({"Name": name, "Address": address})
    return result


@dataclass
class Part:
    """One attachment or inline part."""

    part_id: str
    file_name: str
    content_type: str
    content_id: str
    size: int
    inline: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "PartID": self.part_id,
            "FileName": self.file_name,
            "ContentType": self.content_type,
            "ContentID": self.content_id,
            "Size": self.size,
        }


@dataclass
class ParsedMessage:
    """What the API and the index need from one message."""

    message_id: str = ""
    subject: str = ""
    from_: Optional[dict[str, str]] = None
    to: list[dict[str, str]] = field(default_factory=list)
    cc: list[dict[str, str]] = field(default_factory=list)
    bcc: list[dict[str, str]] = field(default_factory=list)
    reply_to: list[dict[str, str]] = field(default_factory=list)
    return_path: str = ""
    date: Optional[str] = None  # ISO 8601, from the Date: header
    text: str = ""
    html: str = ""
    attachments: list[Part] = field(default_factory=list)
    inline: list[Part] = field(default_factory=list)
    headers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def snippet(self) -> str:
        source = self.text or html_to_text(self.html)
        return " ".join(source.split())[:SNIPPET_LENGTH]

    def search_text(self) -> str:
        """Lower-case text the plain search terms match against."""
        body = self.text or html_to_text(self.html)
        fields = [self.subject, self.message_id]
        for group in (self.to, self.cc, self.bcc, self.reply_to):
            fields.extend(f"{a['Name']} <{a['Address']}>" for a in group)
        if self.from_:
            fields.append(f"{self.from_['Name']} <{self.from_['Address']}>")
        fields.extend(p.file_name for p in self.attachments)
        fields.append(body[:SEARCH_TEXT_LIMIT])
        return "\n".join(fields).lower()


_TAGS = re.compile(r"<[^>]*>")
_DROPPED = re.compile(r"<(script|style|head)\b.*?</\1\s*>", re.I | re.S)


def html_to_text(markup: str) -> str:
    """Rough text of an HTML part, for snippets and search."""
    return html.unescape(_TAGS.sub(" ", _DROPPED.sub(" ", markup)))


def _header_values(message: Message, name: str) -> list[str]:
    try:
        return [str(v) for v in message.get_all(name) or []]
    except Exception:  # a header the policy cannot parse: keep its raw text
        raw = message._headers  # type: ignore[attr-defined]
        return [str(v[1]) for v in raw if v[0].lower() == name.lower()]


def _first(message: Message, name: str) -> str:
    values = _header_values(message, name)
    return values[0].strip() if values else ""


def _payload_text(part: Message) -> str:
    try:
        content = part.get_content()  # type: ignore[attr-defined]
    except Exception:
        raw = part.get_payload(decode=True)
        content = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
    if isinstance(content, bytes):
        return content.decode("utf-8", "replace")
    return str(content)


def _payload_size(part: Message) -> int:
    raw = part.get_payload(decode=True)
    return len(raw) if isinstance(raw, bytes) else 0


def walk_parts(message: Message, prefix: str = "") -> list[tuple[str, Message]]:
    """Every leaf part with its dotted part ID ("1", "2.1", ...)."""
    if not message.is_multipart():
        return [(prefix or "1", message)]
    found = []
    payload = message.get_payload()
    for number, child in enumerate(payload if isinstance(payload, list) else [], 1):
        child_id = f"{prefix}.{number}" if prefix else str(number)
        found.extend(walk_parts(child, child_id))
    return found


def find_part(raw: bytes, part_id: str) -> Optional[tuple[Part, bytes]]:
    """The part C{part_id} of a message and its decoded bytes, or None."""
    message = _parser.parsebytes(raw)
    for found_id, part in walk_parts(message):
        if found_id == part_id:
            data = part.get_payload(decode=True)
            data = data if isinstance(data, bytes) else b""
            return _describe(found_id, part, len(data)), data
    return None


def _describe(part_id: str, part: Message, size: int) -> Part:
    disposition = (part.get_content_disposition() or "").lower()
    content_id = _first(part, "Content-ID").strip("<>")
    return Part(
        part_id=part_id,
        file_name=part.get_filename() or "",
        content_type=part.get_content_type(),
        content_id=content_id,
        size=size,
        inline=disposition != "attachment" and bool(content_id),
    )


def parse_message(raw: bytes) -> ParsedMessage:
    """Parse one message; never raises on malformed mail."""
    message = _parser.parsebytes(raw)
    parsed = ParsedMessage()
    parsed.message_id = _first(message, "Message-ID").strip("<>")
    parsed.subject = " ".join(_first(message, "Subject").split())
    senders = addresses(_header_values(message, "From"))
    parsed.from_ = senders[0] if senders else None
    parsed.to = addresses(_header_values(message, "To"))
    parsed.cc = addresses(_header_values(message, "Cc"))
    parsed.bcc = addresses(_header_values(message, "Bcc"))
    parsed.reply_to = addresses(_header_values(message, "Reply-To"))
    parsed.return_path = _first(message, "Return-Path").strip("<>")
    date = _first(message, "Date")
    if date:
        try:
            parsed.date = parsedate_to_datetime(date).isoformat()
        except (TypeError, ValueError, IndexError):
            parsed.date = None
    for name in message.keys():
        parsed.headers.setdefault(name, _header_values(message, name))
    for part_id, part in walk_parts(message):
        content_type = part.get_content_type()
        disposition = (part.get_content_disposition() or "").lower()
        is_body = disposition != "attachment" and not part.get_filename()
        if is_body and content_type == "text/plain" and not parsed.text:
            parsed.text = _payload_text(part)
        elif is_body and content_type == "text/html" and not parsed.html:
            parsed.html = _payload_text(part)
        elif not part.is_multipart():
            described = _describe(part_id, part, _payload_size(part))
            if described.inline:
                parsed.inline.append(described)
            elif disposition == "attachment" or described.file_name:
                parsed.attachments.append(described)
            elif not content_type.startswith(("text/", "multipart/")):
                parsed.attachments.append(described)
    return parsed


def mailbox_address(value: Any) -> str:
    """An address as a mailbox name: lower case, no angle brackets."""
    text = str(value).strip().strip("<>")
    return text.lower()
