"""Tests for L{twisted_smtpd._data.DataReader}: framing, unstuffing, size limit."""

from __future__ import annotations

from typing import Optional

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tests.strategies import chunked, dot_stuff, framing_bytes, messages, transmission
from twisted_smtpd._data import DataReader


def read(
    chunks: list[bytes], max_size: int = 0
) -> tuple[bytes, Optional[bytes], DataReader]:
    """Feed C{chunks} until the end of data.

    Returns the message passed on, everything after the end marker (the
    leftover of the final feed and any chunks not fed), or None if the data
    never ended, and the reader.
    """
    reader = DataReader(max_size)
    body = []
    for index, chunk in enumerate(chunks):
        piece, leftover = reader.feed(chunk)
        body.append(piece)
        if leftover is not None:
            return b"".join(body), leftover + b"".join(chunks[index + 1 :]), reader
    return b"".join(body), None, reader


def read_bytewise(
    data: bytes, max_size: int = 0
) -> tuple[bytes, Optional[bytes], DataReader]:
    """Feed C{data} one byte at a time."""
    return read([data[i : i + 1] for i in range(len(data))], max_size)


def dot_unstuff(data: bytes) -> bytes:
    """Reference unstuffing, line by line: drop the first period of each line."""
    lines = data.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


class TestReferenceStuffing:
    """The test's own dot-stuffing, so the property tests rest on something sound."""

    @pytest.mark.parametrize(
        "message, stuffed",
        [
            (b"", b""),
            (b"\r\n", b"\r\n"),
            (b".\r\n", b"..\r\n"),
            (b"a\r\n.\r\n", b"a\r\n..\r\n"),
            (b"..x\r\n", b"...x\r\n"),
            (b"a.b\r\n", b"a.b\r\n"),
            (b"a\n.b\r\n", b"a\n.b\r\n"),
            (b"a\r\n.b\r\n.\r\nc\r\n", b"a\r\n..b\r\n..\r\nc\r\n"),
        ],
    )
    def test_dot_stuff(self, message: bytes, stuffed: bytes) -> None:
        """Only periods at the start of a CRLF-delimited line are doubled."""
        assert stuffed == dot_stuff(message)

    @given(messages)
    def test_unstuff_inverts(self, message: bytes) -> None:
        """The reference unstuffing undoes the reference stuffing."""
        assert message == dot_unstuff(dot_stuff(message))

    @given(messages)
    def test_no_end_marker_inside(self, message: bytes) -> None:
        """In a stuffed message the first CRLF.CRLF is the one the client appends."""
        data = b"\r\n" + transmission(message)
        assert len(data) - 5 == data.find(b"\r\n.\r\n")


class TestFraming:
    """The end of data and what follows it."""

    def test_empty_message(self) -> None:
        """A lone '.' line ends an empty message."""
        body, leftover, reader = read([b".\r\n"])
        assert (b"", b"", 0, True) == (body, leftover, reader.size, reader.done)

    def test_simple(self) -> None:
        """Lines up to CRLF.CRLF are the message, its last CRLF included."""
        body, leftover, reader = read([b"Subject: hi\r\n\r\nHello\r\n.\r\n"])
        assert (b"Subject: hi\r\n\r\nHello\r\n", b"") == (body, leftover)
        assert reader.done

    def test_leftover(self) -> None:
        """Bytes after the end marker come back untouched (pipelined commands)."""
        body, leftover, _ = read([b"hi\r\n.\r\nQUIT\r\nNOOP\r\n"])
        assert (b"hi\r\n", b"QUIT\r\nNOOP\r\n") == (body, leftover)

    def test_leftover_with_another_end_marker(self) -> None:
        """Only the first end marker counts; a second is in the leftover."""
        body, leftover, _ = read([b"a\r\n.\r\nb\r\n.\r\n"])
        assert (b"a\r\n", b"b\r\n.\r\n") == (body, leftover)

    def test_not_done(self) -> None:
        """Without the end marker the data goes on."""
        body, leftover, reader = read([b"line one\r\nline two\r\n"])
        assert leftover is None
        assert not reader.done
        assert b"line one\r\nline two\r\n".startswith(body)

    def test_holds_back_possible_marker(self) -> None:
        """The start of a possible end marker is not passed on early."""
        reader = DataReader()
        first, leftover = reader.feed(b"abcdefgh\r\n.")
        assert leftover is None
        assert b"abcdefgh".startswith(first) and b"" != first
        second, leftover = reader.feed(b"\r\n")
        assert (b"abcdefgh\r\n", b"") == (first + second, leftover)

    def test_partial_marker_then_more(self) -> None:
        """A held-back partial marker that turns out to be text is passed on."""
        reader = DataReader()
        first, _ = reader.feed(b"abcdefgh\r\n.\r")
        second, leftover = reader.feed(b"x\r\n.\r\n")
        assert (b"abcdefgh\r\n\rx\r\n", b"") == (first + second, leftover)

    def test_dot_first_line_split(self) -> None:
        """A stuffed period on the first line is unstuffed when it arrives alone."""
        assert (b".x\r\n", b"") == read([b".", b".", b"x\r\n.\r\n"])[:2]

    def test_marker_split_everywhere(self) -> None:
        """The end marker is found however it is split across reads."""
        data = b"text\r\n.\r\nAFTER"
        for cut in range(len(data) + 1):
            body, leftover, _ = read([data[:cut], data[cut:]])
            assert (b"text\r\n", b"AFTER") == (body, leftover), cut

    def test_bytewise(self) -> None:
        """Feeding one byte at a time gives the same result."""
        body, leftover, _ = read_bytewise(b"..a\r\n..\r\n.b\r\n.\r\nX")
        assert (b".a\r\n.\r\nb\r\n", b"X") == (body, leftover)

    def test_empty_feed(self) -> None:
        """Feeding no bytes passes nothing on and keeps going."""
        reader = DataReader()
        assert (b"", None) == reader.feed(b"")
        assert (b"", b"") == reader.feed(b".\r\n")

    def test_feed_after_done(self) -> None:
        """Feeding after the end of data is a programming error."""
        reader = DataReader()
        reader.feed(b".\r\n")
        with pytest.raises(RuntimeError):
            reader.feed(b"more")

    def test_feed_after_done_with_leftover(self) -> None:
        """The reader stays finished even when the end came with leftover bytes."""
        reader = DataReader()
        reader.feed(b"x\r\n.\r\nRSET\r\n")
        with pytest.raises(RuntimeError):
            reader.feed(b"")

    def test_binary_and_nul(self) -> None:
        """Any octet, NUL and 8-bit included, passes through unchanged."""
        payload = bytes(range(256)).replace(b"\r", b"").replace(b"\n", b"") + b"\r\n"
        assert payload == read([payload + b".\r\n"])[0]


class TestUnstuffing:
    """Removing the period added to lines that begin with one."""

    @pytest.mark.parametrize(
        "wire, message",
        [
            (b"..\r\n.\r\n", b".\r\n"),
            (b"...\r\n.\r\n", b"..\r\n"),
            (b"..hidden\r\n.\r\n", b".hidden\r\n"),
            (b"a\r\n..\r\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
            (b"a\r\n..\r\n..\r\n.\r\n", b"a\r\n.\r\n.\r\n"),
            (b"a.b\r\n.\r\n", b"a.b\r\n"),
            (b"a\r\n. x\r\n.\r\n", b"a\r\n x\r\n"),
            (b"\r\n..\r\n.\r\n", b"\r\n.\r\n"),
        ],
    )
    def test_unstuff(self, wire: bytes, message: bytes) -> None:
        """The first period of a line starting with one is removed."""
        assert (message, b"") == read([wire])[:2]
        assert (message, b"") == read_bytewise(wire)[:2]

    @pytest.mark.parametrize("wire", [b"a\n..b\r\n.\r\n", b"a\r..b\r\n.\r\n"])
    def test_bare_line_ends_do_not_start_lines(self, wire: bytes) -> None:
        """A period after a bare LF or CR is not at a line start and is kept."""
        assert (wire[:-3], b"") == read([wire])[:2]


class TestSmuggling:
    """Only CRLF.CRLF ends the data (SMTP smuggling, CVE-2023-51766 and kin)."""

    #: (fake end, what the message keeps of it): a period after a CRLF is at
    #: the start of a line and unstuffed, so it goes; anything else stays
    FAKE_ENDS = [
        (b"\n.\n", b"\n.\n"),
        (b"\n.\r\n", b"\n.\r\n"),
        (b"\r\n.\n", b"\r\n\n"),
        (b"\r.\r", b"\r.\r"),
        (b"\r.\r\n", b"\r.\r\n"),
        (b"\r\n.\r", b"\r\n\r"),
        (b"\n.\r", b"\n.\r"),
        (b"\r.\n", b"\r.\n"),
        (b"\r\n\x00.\r\n", b"\r\n\x00.\r\n"),
        (b"\r\n .\r\n", b"\r\n .\r\n"),
    ]
    FAKE_IDS = [repr(fake) for fake, _ in FAKE_ENDS]
    SMUGGLED = (
        b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
    )

    @pytest.mark.parametrize("fake, kept", FAKE_ENDS, ids=FAKE_IDS)
    def test_fake_end_does_not_end(self, fake: bytes, kept: bytes) -> None:
        """A fake end followed by smuggled commands stays in the message."""
        head = b"Subject: test\r\n\r\nTesting"
        tail = self.SMUGGLED + b"NO SMUGGLING\r\n"
        body, leftover, _ = read([head + fake + tail + b".\r\nQUIT\r\n"])
        assert (head + kept + tail, b"QUIT\r\n") == (body, leftover)

    @pytest.mark.parametrize("fake, kept", FAKE_ENDS, ids=FAKE_IDS)
    def test_fake_end_bytewise(self, fake: bytes, kept: bytes) -> None:
        """Fake ends fed a byte at a time do not end the data either."""
        tail = self.SMUGGLED + b"NO SMUGGLING\r\n"
        body, leftover, _ = read_bytewise(b"Testing" + fake + tail + b".\r\n")
        assert (b"Testing" + kept + tail, b"") == (body, leftover)

    @pytest.mark.parametrize("fake, kept", FAKE_ENDS, ids=FAKE_IDS)
    def test_fake_end_alone(self, fake: bytes, kept: bytes) -> None:
        """A fake end at the very start never ends the data, whole or bytewise."""
        assert None is read([fake])[1]
        assert None is read_bytewise(fake + self.SMUGGLED)[1]

    def test_aiosmtpd_case(self) -> None:
        """The message of aiosmtpd's test_smtp_smuggling arrives whole."""
        data = (
            b"From: Anne Person <anne@example.com>\r\n"
            b"To: Bart Person <bart@example.com>\r\n"
            b"Subject: A test\r\n"
            b"Message-ID: <ant>\r\n"
            b"\r\n"
            b"Testing"
            b"\n.\r\n"
            b"NO SMUGGLING\n"
            b"\r\n.\r\n"
        )
        body, leftover, _ = read([data])
        assert b"" == leftover
        assert body.endswith(b"Testing\n.\r\nNO SMUGGLING\n\r\n")

    def test_lf_dot_lf_in_whole_stream(self) -> None:
        """Bare LF line ends never end data, however many there are."""
        assert None is read([b"a\n.\nb\n.\n\n.\n"])[1]


class TestSizeLimit:
    """max_size: the largest message passed on."""

    def test_within(self) -> None:
        """A message of exactly max_size bytes is passed on whole."""
        body, leftover, reader = read([b"12345678\r\n.\r\n"], max_size=10)
        assert (b"12345678\r\n", b"", False, 10) == (
            body,
            leftover,
            reader.too_big,
            reader.size,
        )

    def test_over(self) -> None:
        """One byte over max_size marks the message too big and passes nothing on."""
        body, leftover, reader = read([b"123456789\r\n.\r\nQUIT\r\n"], max_size=10)
        assert (b"", b"QUIT\r\n", True, 11) == (
            body,
            leftover,
            reader.too_big,
            reader.size,
        )

    def test_zero_means_unlimited(self) -> None:
        """max_size 0 passes on messages of any size."""
        data = b"x" * 100_000 + b"\r\n"
        body, _, reader = read([data + b".\r\n"], max_size=0)
        assert (data, False) == (body, reader.too_big)

    def test_stops_passing_on(self) -> None:
        """Once over the limit nothing more is passed on, yet the end is found."""
        reader = DataReader(max_size=100)
        passed = []
        for _ in range(50):
            piece, leftover = reader.feed(b"y" * 38 + b"\r\n")
            assert leftover is None
            passed.append(piece)
        piece, leftover = reader.feed(b".\r\nNOOP\r\n")
        passed.append(piece)
        assert b"NOOP\r\n" == leftover
        assert reader.too_big and reader.done
        assert 100 >= len(b"".join(passed))
        assert 50 * 40 == reader.size

    def test_size_counts_unstuffed(self) -> None:
        """The size is of the message after unstuffing."""
        _, _, reader = read([b"..\r\n..\r\n.\r\n"], max_size=6)
        assert (6, False) == (reader.size, reader.too_big)

    def test_size_without_limit(self) -> None:
        """size is counted without a limit too."""
        assert 7 == read([b"abcde\r\n.\r\n"])[2].size

    @given(messages, st.integers(0, 300), framing_bytes, st.data())
    def test_limit_property(
        self, message: bytes, max_size: int, after: bytes, data: st.DataObject
    ) -> None:
        """Over the limit at most max_size bytes of prefix pass; the end is found."""
        chunks = data.draw(chunked(transmission(message, after)))
        body, leftover, reader = read(chunks, max_size)
        assert after == leftover
        assert len(message) == reader.size
        limited = max_size and len(message) > max_size
        assert bool(limited) == reader.too_big
        if limited:
            assert message.startswith(body)
            assert max_size >= len(body)
        else:
            assert message == body


class TestRoundTrip:
    """The reader inverts dot-stuffing exactly, however the bytes arrive."""

    @given(messages, framing_bytes, st.data())
    def test_round_trip(
        self, message: bytes, after: bytes, data: st.DataObject
    ) -> None:
        """A stuffed message split anywhere comes back exactly, and so does the rest."""
        chunks = data.draw(chunked(transmission(message, after)))
        body, leftover, reader = read(chunks)
        assert (message, after) == (body, leftover)
        assert len(message) == reader.size
        assert reader.done and not reader.too_big

    @given(messages, framing_bytes)
    def test_round_trip_bytewise(self, message: bytes, after: bytes) -> None:
        """A byte at a time, the message and the leftover come back exactly."""
        assert (message, after) == read_bytewise(transmission(message, after))[:2]

    @given(framing_bytes, st.data())
    def test_only_crlf_dot_crlf_ends(self, raw: bytes, data: st.DataObject) -> None:
        """Bytes without CRLF.CRLF (a CRLF assumed before them) never end the data."""
        assume(b"\r\n.\r\n" not in b"\r\n" + raw)
        body, leftover, reader = read(data.draw(chunked(raw)))
        assert (None, False) == (leftover, reader.done)
        assert dot_unstuff(raw).startswith(body)

    @given(messages)
    def test_never_ends_early(self, message: bytes) -> None:
        """Without its final '.' line a stuffed message never ends the data."""
        body, leftover, reader = read([dot_stuff(message)])
        assert None is leftover
        assert not reader.done
        assert message.startswith(body)
