"""Handler output made safe for the wire (L{twisted_smtpd._sanitize})."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from twisted_smtpd._sanitize import (
    MAX_QUEUE_ID,
    MAX_REPLY_LINES,
    MAX_TEXT_LINE,
    safe_queue_id,
    safe_reply,
)
from twisted_smtpd.replies import R451_LOCAL_ERROR, Reply, format_reply


def wire_lines(reply: Reply) -> list[bytes]:
    data = format_reply(reply, enhanced=True)
    assert data.endswith(b"\r\n")
    return data[:-2].split(b"\r\n")


class TestReply:
    def test_clean_reply_is_kept(self) -> None:
        reply = Reply(550, "5.7.1", "Spam is not welcome here")
        assert (reply, []) == safe_reply(reply)

    def test_multi_line_stays_multi_line(self) -> None:
        reply = Reply(550, "5.7.1", "Refused\nSee https://example.org/why")
        assert (reply, []) == safe_reply(reply)

    def test_bare_cr_cannot_smuggle_a_reply(self) -> None:
        """550 5.7.1 refused\\r250 2.0.0 fake stays one 550 line."""
        safe, changes = safe_reply(Reply(550, "5.7.1", "refused\r250 2.0.0 fake"))
        assert [b"550 5.7.1 refused?250 2.0.0 fake"] == wire_lines(safe)
        assert ["1 control or non-ASCII characters replaced by '?'"] == changes

    def test_nul_and_controls(self) -> None:
        safe, changes = safe_reply(Reply(451, "4.3.0", "a\0b\x1bc\x7fd\u00e9"))
        assert "a?b?c?d?" == safe.text
        assert changes

    def test_crlf_is_a_line_break(self) -> None:
        safe, _ = safe_reply(Reply(554, "5.0.0", "one\r\ntwo"))
        assert [b"554-5.0.0 one", b"554 5.0.0 two"] == wire_lines(safe)

    def test_a_megabyte_line_is_cut(self) -> None:
        safe, changes = safe_reply(Reply(550, "5.7.1", "x" * 1_000_000))
        (line,) = wire_lines(safe)
        assert len(line) + 2 <= 512 and line.endswith(b"...")
        assert [f"1 lines longer than {MAX_TEXT_LINE} characters cut"] == changes

    def test_too_many_lines(self) -> None:
        safe, changes = safe_reply(Reply(550, "5.7.1", "\n".join(["x"] * 1000)))
        assert MAX_REPLY_LINES == len(wire_lines(safe))
        assert [f"1000 lines cut to {MAX_REPLY_LINES}"] == changes

    def test_a_refusal_must_refuse(self) -> None:
        """An SMTPError(250, ...) would tell the client it worked: 451 instead."""
        safe, changes = safe_reply(Reply(250, "2.0.0", "fake OK"))
        assert R451_LOCAL_ERROR is safe
        assert ["code 250 is not a refusal: sent 451 4.3.0"] == changes

    @given(st.text(max_size=3000))
    def test_any_text_gives_well_formed_lines(self, text: str) -> None:
        safe, _ = safe_reply(Reply(550, "5.7.1", text))
        lines = wire_lines(safe)
        assert 1 <= len(lines) <= MAX_REPLY_LINES
        for n, line in enumerate(lines):
            last = n == len(lines) - 1
            assert line.startswith(b"550 5.7.1 " if last else b"550-5.7.1 ")
            assert len(line) + 2 <= 512
            assert all(32 <= byte <= 126 for byte in line)


class TestQueueId:
    def test_clean_id_is_kept(self) -> None:
        assert ("1796115986.M1P2Q3.host\\057x", []) == safe_queue_id(
            "1796115986.M1P2Q3.host\\057x"
        )

    def test_bytes_are_text(self) -> None:
        assert ("abc123", ["bytes decoded"]) == safe_queue_id(b"abc123")

    def test_bytes_not_ascii(self) -> None:
        text, changes = safe_queue_id(b"ab\xffc")
        assert "ab?c" == text and "bytes decoded" in changes

    def test_other_types(self) -> None:
        assert ("42", ["int made text"]) == safe_queue_id(42)

    def test_cr_lf_space(self) -> None:
        text, changes = safe_queue_id("id\r\n250 2.0.0 fake")
        assert "id??250?2.0.0?fake" == text
        assert ["4 space, control or non-ASCII characters replaced by '?'"] == changes

    def test_long_id_is_cut(self) -> None:
        text, changes = safe_queue_id("q" * 10_000)
        assert MAX_QUEUE_ID == len(text) and text.endswith("...")
        assert [f"cut to {MAX_QUEUE_ID} characters"] == changes
