"""The catcher's pure parts: MIME parsing and the search syntax."""

from __future__ import annotations

import sqlite3

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted_smtpd.web._message import _parser as parser
from twisted_smtpd.web._message import (
    find_part,
    html_to_text,
    message_id_for,
    parse_message,
    walk_parts,
)
from twisted_smtpd.web._query import condition_for, split_terms

from .web_helpers import PROBE_HTML, make_message

MULTIPART = (
    b"From: =?utf-8?q?J=C3=B6rg?= <joerg@example.org>\r\n"
    b'To: a@example.org, "B, Person" <b@example.org>\r\n'
    b"Subject: =?utf-8?b?R3LDvMOfZQ==?=\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"Date: Tue, 01 Dec 2026 10:00:00 +0100\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="outer"\r\n'
    b"\r\n"
    b"--outer\r\n"
    b'Content-Type: multipart/alternative; boundary="inner"\r\n'
    b"\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Gr=FC=DFe aus K=F6ln\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<p>Hello <b>there</b></p><script>alert(1)</script>\r\n"
    b"--inner--\r\n"
    b"--outer\r\n"
    b'Content-Type: application/octet-stream; name="data.bin"\r\n'
    b'Content-Disposition: attachment; filename="data.bin"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"AAECAw==\r\n"
    b"--outer--\r\n"
)


def test_parse_a_nested_multipart_message():
    parsed = parse_message(MULTIPART)
    assert parsed.subject == "Grüße"
    assert parsed.from_ == {"Name": "Jörg", "Address": "joerg@example.org"}
    assert parsed.to == [
        {"Name": "", "Address": "a@example.org"},
        {"Name": "B, Person", "Address": "b@example.org"},
    ]
    assert parsed.message_id == "m1@example.org"
    assert parsed.date == "2026-12-01T10:00:00+01:00"
    assert parsed.text.strip() == "Grüße aus Köln"
    assert parsed.html.startswith("<p>Hello")
    [attachment] = parsed.attachments
    assert (attachment.part_id, attachment.file_name, attachment.size) == (
        "2",
        "data.bin",
        4,
    )
    assert parsed.inline == []
    assert parsed.snippet == "Grüße aus Köln"
    assert [part_id for part_id, _ in walk_parts(parser.parsebytes(MULTIPART))] == [
        "1.1",
        "1.2",
        "2",
    ]
    part, data = find_part(MULTIPART, "2")
    assert (
        data == b"\x00\x01\x02\x03" and part.content_type == "application/octet-stream"
    )
    assert find_part(MULTIPART, "3") is None


def test_html_only_message_gets_a_text_snippet_without_script_or_style():
    message = make_message("html only", text="ignored")
    message.set_content(
        "<style>p{color:red}</style><p>Visible &amp; kept</p>" + PROBE_HTML,
        subtype="html",
    )
    parsed = parse_message(message.as_bytes())
    assert parsed.text == ""
    assert parsed.snippet.startswith("Visible & kept Welcome script did not run")
    assert "color" not in parsed.snippet and "textContent" not in parsed.snippet
    assert "getElementById" not in html_to_text(PROBE_HTML)


def test_malformed_mail_still_parses():
    parsed = parse_message(b"no headers at all, just text")
    assert parsed.subject == "" and parsed.from_ is None
    parsed = parse_message(
        b"From: <<<broken\r\nTo: ,,,\r\nDate: not a date\r\n"
        b"Content-Type: text/plain; charset=no-such-charset\r\n\r\n\xff\xfe body\r\n"
    )
    assert parsed.date is None
    assert "body" in parsed.text
    parsed = parse_message(
        b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\n'
        b"Content-Type: text/plain\r\n\r\nunterminated"
    )
    assert "unterminated" in parsed.text


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_parse_never_raises(raw):
    parsed = parse_message(raw)
    parsed.search_text()
    assert len(parsed.snippet) <= 250


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.sampled_from(["From: ", "To: ", "Subject: ", "Content-Type: ", "\r\n"])
        | st.text(max_size=30),
        max_size=20,
    )
)
def test_parse_never_raises_on_header_soup(pieces):
    raw = "".join(pieces).encode("utf-8", "surrogatepass")
    parse_message(raw)
    find_part(raw, "1")


def test_ids_are_stable_and_mailpit_shaped():
    first = message_id_for("1700000000.M1P2Q3.host")
    assert first == message_id_for("1700000000.M1P2Q3.host")
    assert first != message_id_for("1700000000.M1P2Q4.host")
    assert len(first) == 22 and "=" not in first and "/" not in first


def test_split_terms_keeps_quoted_phrases():
    assert split_terms('from:a "two words" -subject:"x y"  z') == [
        "from:a",
        "two words",
        "-subject:x y",
        "z",
    ]
    assert split_terms("   ") == []


def _matches(query, rows):
    """Run condition_for against a tiny table shaped like the index."""
    db = sqlite3.connect(":memory:")
    db.execute(
        "CREATE TABLE messages (id TEXT, from_text TEXT, to_text TEXT,"
        " subject_text TEXT, message_id_text TEXT, search_text TEXT,"
        " read INTEGER, attachments INTEGER)"
    )
    db.execute("CREATE TABLE mailboxes (id TEXT, mailbox TEXT)")
    for row in rows:
        db.execute("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?)", row)
        db.execute("INSERT INTO mailboxes VALUES (?, ?)", (row[0], row[2]))
    condition, params = condition_for(query)
    return sorted(
        r[0] for r in db.execute(f"SELECT id FROM messages WHERE {condition}", params)
    )


def test_conditions():
    rows = [
        ("1", "alice <a@x>", "bob@y", "hello 50%", "m1", "hello 50% body", 0, 0),
        ("2", "carol <c@x>", "dan@y", "under_score", "m2", "other text", 1, 2),
    ]
    assert _matches("", rows) == ["1", "2"]
    assert _matches("from:ALICE", rows) == ["1"]
    assert _matches("to:dan", rows) == ["2"]
    assert _matches("subject:50%", rows) == ["1"]
    assert _matches("subject:under_", rows) == ["2"]
    assert _matches("subject:unde_", rows) == []  # _ is not a wildcard
    assert _matches("is:read", rows) == ["2"]
    assert _matches("!is:read", rows) == ["1"]
    assert _matches("has:attachments", rows) == ["2"]
    assert _matches("mailbox:bob@y", rows) == ["1"]
    assert _matches("message-id:m2", rows) == ["2"]
    assert _matches("body", rows) == ["1"]
    assert _matches("-", rows) == []  # a lone dash is a word, not a negation
    assert _matches("from:", rows) == []  # no value: the literal text
    assert _matches("x' OR 1=1 --", rows) == []  # parameters, not SQL
