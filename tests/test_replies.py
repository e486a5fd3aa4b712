"""Tests for L{twisted_smtpd.replies}: the reply table, formatting and SMTPError."""

from __future__ import annotations

import pickle
import re
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_smtpd import replies
from twisted_smtpd.replies import (
    R220_READY,
    R250_OK,
    R550_MAILBOX_UNAVAILABLE,
    Reply,
    SMTPError,
    fill,
    format_reply,
)

ALL_REPLIES = sorted(
    (name, value)
    for name, value in vars(replies).items()
    if name.startswith("R") and isinstance(value, Reply)
)


class TestReply:
    """Construction and validation of L{Reply}."""

    def test_fields(self) -> None:
        """A reply keeps its code, enhanced code and text."""
        reply = Reply(250, "2.1.0", "Sender OK")
        assert (250, "2.1.0", "Sender OK") == (reply.code, reply.enhanced, reply.text)

    @pytest.mark.parametrize("code", [0, 199, 600, 1000, -250])
    def test_code_out_of_range(self, code: int) -> None:
        """Codes outside 200-599 are refused."""
        with pytest.raises(ValueError, match="out of range"):
            Reply(code, "", "x")

    @pytest.mark.parametrize("code", [200, 599])
    def test_code_bounds_accepted(self, code: int) -> None:
        """The lowest and highest valid codes are accepted."""
        assert code == Reply(code, "", "x").code

    @pytest.mark.parametrize(
        "code, enhanced",
        [
            (250, "5.0.0"),
            (550, "4.1.1"),
            (451, "2.0.0"),
            (550, "5.1"),
            (550, "5.1.1.1"),
            (550, "5"),
        ],
    )
    def test_enhanced_must_fit_code(self, code: int, enhanced: str) -> None:
        """An enhanced code of another class or shape than x.y.z is refused."""
        with pytest.raises(ValueError, match="does not fit"):
            Reply(code, enhanced, "x")

    def test_empty_enhanced_allowed(self) -> None:
        """Replies may carry no enhanced code at all."""
        assert "" == Reply(354, "", "go ahead").enhanced

    def test_frozen(self) -> None:
        """Replies are immutable values."""
        with pytest.raises(AttributeError):
            R250_OK.code = 550  # type: ignore[misc]

    def test_equality(self) -> None:
        """Two replies with the same fields are equal and hash alike."""
        assert Reply(250, "2.0.0", "OK") == R250_OK
        assert hash(Reply(250, "2.0.0", "OK")) == hash(R250_OK)

    def test_with_text(self) -> None:
        """with_text keeps code and enhanced code and replaces only the text."""
        assert Reply(
            550, "5.1.1", "No such user"
        ) == R550_MAILBOX_UNAVAILABLE.with_text("No such user")

    def test_with_text_leaves_original(self) -> None:
        """with_text returns a new reply and leaves the table constant alone."""
        R550_MAILBOX_UNAVAILABLE.with_text("other")
        assert "Mailbox unavailable" == R550_MAILBOX_UNAVAILABLE.text


class TestReplyTable:
    """Every constant of the reply table is well formed."""

    def test_table_not_empty(self) -> None:
        """The module defines a substantial reply table."""
        assert 40 <= len(ALL_REPLIES)

    @pytest.mark.parametrize(
        "name, reply", ALL_REPLIES, ids=[n for n, _ in ALL_REPLIES]
    )
    def test_name_matches_code(self, name: str, reply: Reply) -> None:
        """Each constant's name starts with R and its reply code."""
        assert f"R{reply.code}" == name.split("_")[0]

    @pytest.mark.parametrize(
        "name, reply", ALL_REPLIES, ids=[n for n, _ in ALL_REPLIES]
    )
    def test_enhanced_shape(self, name: str, reply: Reply) -> None:
        """Enhanced codes are empty or class.subject.detail with numbers."""
        if reply.enhanced:
            assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", reply.enhanced)
            assert str(reply.code)[0] == reply.enhanced[0]

    @pytest.mark.parametrize(
        "name, reply", ALL_REPLIES, ids=[n for n, _ in ALL_REPLIES]
    )
    def test_errors_carry_enhanced_codes(self, name: str, reply: Reply) -> None:
        """Every 4xx and 5xx reply has an enhanced status code (RFC 2034)."""
        if reply.code >= 400:
            assert "" != reply.enhanced

    @pytest.mark.parametrize(
        "name, reply", ALL_REPLIES, ids=[n for n, _ in ALL_REPLIES]
    )
    def test_text_is_clean(self, name: str, reply: Reply) -> None:
        """Reply text is printable ASCII with no CR or LF of its own."""
        assert all(char in string.printable for char in reply.text)
        assert "\r" not in reply.text and "\n" not in reply.text
        assert reply.text == reply.text.strip()

    @pytest.mark.parametrize(
        "name, reply", ALL_REPLIES, ids=[n for n, _ in ALL_REPLIES]
    )
    def test_placeholders_fill(self, name: str, reply: Reply) -> None:
        """Filling every placeholder leaves no braces and keeps the codes."""
        names = {
            field for _, field, _, _ in string.Formatter().parse(reply.text) if field
        }
        filled = fill(reply, **{field: "X" for field in names})
        assert "{" not in filled.text and "}" not in filled.text
        assert (reply.code, reply.enhanced) == (filled.code, filled.enhanced)

    def test_reply_codes_are_unique_values(self) -> None:
        """No two constants hold an identical reply (each is its own case)."""
        values = [reply for _, reply in ALL_REPLIES]
        assert len(values) == len(set(values))


class TestFill:
    """Placeholder substitution."""

    def test_fill(self) -> None:
        """Named placeholders are replaced by the given values."""
        assert (
            "mx.test ESMTP app ready"
            == fill(R220_READY, hostname="mx.test", app="app").text
        )

    def test_fill_non_string(self) -> None:
        """Values are formatted with str()."""
        assert "OK: queued as 42" == fill(replies.R250_QUEUED, queue_id=42).text

    def test_fill_missing_value(self) -> None:
        """A missing placeholder value is a programming error."""
        with pytest.raises(KeyError):
            fill(R220_READY, hostname="mx.test")

    def test_fill_keeps_codes(self) -> None:
        """Filling keeps the reply code and enhanced code."""
        reply = fill(replies.R503_MAIL_FIRST, verb="RCPT")
        assert Reply(503, "5.5.1", "Need MAIL before RCPT") == reply


class TestFormatReply:
    """Encoding replies for the wire."""

    def test_single_line_plain(self) -> None:
        """Without enhanced codes a reply is code, space, text, CRLF."""
        assert b"250 OK\r\n" == format_reply(R250_OK, False)

    def test_single_line_enhanced(self) -> None:
        """With enhanced codes the x.y.z code follows the reply code."""
        assert b"250 2.0.0 OK\r\n" == format_reply(R250_OK, True)

    def test_no_enhanced_code_to_print(self) -> None:
        """A reply without an enhanced code prints none even when asked."""
        reply = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
        assert b"354 End data with <CR><LF>.<CR><LF>\r\n" == format_reply(reply, True)

    def test_multi_line(self) -> None:
        """Every line but the last has a hyphen after the code."""
        reply = Reply(250, "", "mx.test Hello client\nPIPELINING\nSIZE 1000")
        expected = b"250-mx.test Hello client\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
        assert expected == format_reply(reply, True)

    def test_multi_line_enhanced(self) -> None:
        """The enhanced code is repeated on each line of a multi-line reply."""
        reply = Reply(550, "5.7.1", "first\nsecond")
        expected = b"550-5.7.1 first\r\n550 5.7.1 second\r\n"
        assert expected == format_reply(reply, True)

    def test_multi_line_plain(self) -> None:
        """Multi-line replies without enhanced codes have no prefix on any line."""
        reply = Reply(550, "5.7.1", "first\nsecond\nthird")
        expected = b"550-first\r\n550-second\r\n550 third\r\n"
        assert expected == format_reply(reply, False)

    def test_empty_line_inside(self) -> None:
        """An empty line inside a multi-line reply still gets its code."""
        expected = b"250-a\r\n250-\r\n250 b\r\n"
        assert expected == format_reply(Reply(250, "", "a\n\nb"), False)

    def test_utf8_text(self) -> None:
        """Non-ASCII text is encoded as UTF-8."""
        reply = Reply(250, "", "Grüße")
        assert "250 Grüße\r\n".encode() == format_reply(reply, False)

    def test_surrogate_escape(self) -> None:
        """Lone surrogates from undecodable input go back out as the original bytes."""
        name = b"h\xffst".decode("utf-8", "surrogateescape")
        reply = fill(replies.R250_HELO, hostname="mx.test", name=name)
        assert b"250 mx.test Hello h\xffst\r\n" == format_reply(reply, True)

    def test_returns_bytes(self) -> None:
        """The result is bytes ready for the transport."""
        assert isinstance(format_reply(R250_OK, True), bytes)

    @pytest.mark.parametrize("lines", [1, 2, 5, 30])
    def test_line_count(self, lines: int) -> None:
        """A reply of N text lines becomes exactly N CRLF-terminated lines."""
        reply = Reply(214, "2.0.0", "\n".join(f"line {i}" for i in range(lines)))
        wire = format_reply(reply, True)
        parts = wire.split(b"\r\n")
        assert lines + 1 == len(parts)
        assert b"" == parts[-1]
        assert [b"214-"] * (lines - 1) + [b"214 "] == [p[:4] for p in parts[:-1]]


class TestSMTPError:
    """The forms of the L{SMTPError} constructor."""

    def test_code_enhanced_text(self) -> None:
        """Code, enhanced code and text build the reply."""
        error = SMTPError(550, "5.7.1", "Spam is not welcome here")
        assert Reply(550, "5.7.1", "Spam is not welcome here") == error.reply

    def test_code_only(self) -> None:
        """A bare code gets a generic text and no enhanced code."""
        error = SMTPError(450)
        assert Reply(450, "", "Requested action not taken") == error.reply

    def test_code_and_enhanced(self) -> None:
        """Code and enhanced code without text get the generic text."""
        error = SMTPError(550, "5.1.1")
        assert Reply(550, "5.1.1", "Requested action not taken") == error.reply

    def test_keyword_text(self) -> None:
        """The text may be given by keyword."""
        error = SMTPError(451, text="Try later")
        assert Reply(451, "", "Try later") == error.reply

    def test_reply(self) -> None:
        """A table constant is used as it is."""
        error = SMTPError(R550_MAILBOX_UNAVAILABLE)
        assert R550_MAILBOX_UNAVAILABLE is error.reply

    def test_reply_with_text(self) -> None:
        """A table constant with text keeps its codes and takes the text."""
        error = SMTPError(R550_MAILBOX_UNAVAILABLE, text="No such user here")
        assert Reply(550, "5.1.1", "No such user here") == error.reply

    def test_invalid_code(self) -> None:
        """An impossible code is refused when the error is made."""
        with pytest.raises(ValueError):
            SMTPError(700, "", "x")

    def test_mismatched_enhanced(self) -> None:
        """An enhanced code of another class than the code is refused."""
        with pytest.raises(ValueError):
            SMTPError(550, "4.0.0", "x")

    def test_args(self) -> None:
        """The exception arguments are the reply's fields."""
        error = SMTPError(550, "5.7.1", "No")
        assert (550, "5.7.1", "No") == error.args

    def test_str(self) -> None:
        """str() reads like the reply line."""
        assert "550 5.7.1 No" == str(SMTPError(550, "5.7.1", "No"))

    def test_str_without_enhanced(self) -> None:
        """str() has no double space when there is no enhanced code."""
        assert "450 Later" == str(SMTPError(450, "", "Later"))

    def test_is_exception(self) -> None:
        """SMTPError can be raised and caught as an Exception."""
        with pytest.raises(Exception) as info:
            raise SMTPError(R250_OK)
        assert R250_OK == info.value.reply  # type: ignore[attr-defined]

    def test_pickle(self) -> None:
        """An SMTPError survives pickling with its reply intact."""
        error = SMTPError(550, "5.7.1", "No")
        copy = pickle.loads(pickle.dumps(error))
        assert error.reply == copy.reply

    def test_pickle_reply_form(self) -> None:
        """An SMTPError made from a table constant also survives pickling."""
        copy = pickle.loads(pickle.dumps(SMTPError(R550_MAILBOX_UNAVAILABLE)))
        assert R550_MAILBOX_UNAVAILABLE == copy.reply


class TestQueuedReply:
    """queued_reply (the 250 after every message) is fill(R250_QUEUED) exactly."""

    @given(st.text(max_size=40))
    def test_same_as_fill(self, queue_id: str) -> None:
        from twisted_smtpd.replies import R250_QUEUED, fill, queued_reply

        fast, general = queued_reply(queue_id), fill(R250_QUEUED, queue_id=queue_id)
        assert general == fast
        for enhanced in (True, False):
            assert format_reply(general, enhanced) == fast.encoded(enhanced)

    @given(st.text(max_size=40))
    def test_wire_same_as_fill(self, queue_id: str) -> None:
        """queued_wire (the protocol's 250 without a Reply) is its wire form."""
        from twisted_smtpd.replies import R250_QUEUED, fill, queued_wire

        general = fill(R250_QUEUED, queue_id=queue_id)
        for enhanced in (True, False):
            assert format_reply(general, enhanced) == queued_wire(queue_id, enhanced)
