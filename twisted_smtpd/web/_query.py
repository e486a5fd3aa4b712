# -*- test-case-name: tests.test_web_message -*-
"""
Mailpit's search syntax, turned into an SQL condition for the index.

Supported: plain words and "quoted phrases" (anywhere in the message),
C{from:}, C{to:} (also Cc, Bcc and envelope recipients), C{subject:},
C{message-id:}, C{mailbox:}, C{is:read}, C{is:unread}, C{has:attachment},
and C{-term} or C{!term} to negate any of them.  Matching ignores case.
"""

from __future__ import annotations

__all__ = ["split_terms", "condition_for"]

_COLUMNS = {
    "from": "from_text",
    "to": "to_text",
    "subject": "subject_text",
    "message-id": "message_id_text",
}


def split_terms(query: str) -> list[str]:
    """Split on white space outside double quotes; quotes are removed."""
    terms: list[str] = []
    current: list[str] = []
    quoted = False
    for char in query:
        if char == '"':
            quoted = not quoted
        elif char.isspace() and not quoted:
            if current:
                terms.append("".join(current))
                current = []
        else:
            current.append(char)
    if current:
        terms.append("".join(current))
    return terms


def _like(value: str) -> str:
    escaped = value.lower().replace("\\", "\\\\").replace("%", "\\%")
    return "%" + escaped.replace("_", "\\_") + "%"


def _one(term: str) -> tuple[str, list[object]]:
    key, colon, value = term.partition(":")
    key = key.lower()
    if colon and key in _COLUMNS and value:
        return f"{_COLUMNS[key]} LIKE ? ESCAPE '\\'", [_like(value)]
    if colon and key == "mailbox" and value:
        return (
            "id IN (SELECT id FROM mailboxes WHERE mailbox = ?)",
            [value.lower()],
        )
    if colon and key == "is" and value.lower() in ("read", "unread"):
        return ("read = 1" if value.lower() == "read" else "read = 0"), []
    if colon and key == "has" and value.lower() in ("attachment", "attachments"):
        return "attachments > 0", []
    return "search_text LIKE ? ESCAPE '\\'", [_like(term)]


def condition_for(query: str) -> tuple[str, list[object]]:
    """The WHERE condition (C{"1"} for an empty query) and its parameters."""
    parts: list[str] = []
    params: list[object] = []
    for term in split_terms(query):
        negate = term[:1] in ("-", "!") and len(term) > 1
        sql, values = _one(term[1:] if negate else term)
        parts.append(f"NOT ({sql})" if negate else f"({sql})")
        params.extend(values)
    return (" AND ".join(parts) or "1"), params
