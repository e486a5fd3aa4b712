"""The input modes, with no transport: whole, byte by byte, at random splits."""

from __future__ import annotations

import sys

from hypothesis import given
from hypothesis import strategies as st

from twisted_smtpd._data import DataReader
from twisted_smtpd._input import ChunkMode, DataMode, DiscardLine, LineMode, RawMode


class Owner:
    """What a mode needs of the protocol: a mode slot, a position, waits."""

    def __init__(self) -> None:
        self._mode = None
        self._pos = 0
        self._waits = 0
        self.buffer = b""
        self.events: list = []

    def _set_mode(self, mode) -> None:
        self._mode = mode

    def feed(self, data: bytes) -> None:
        """The protocol's read loop in miniature."""
        self.buffer += data
        pos = 0
        while pos < len(self.buffer) and not self._waits:
            mode = self._mode
            taken = mode.consume(self.buffer, pos)
            if taken == pos and self._mode is mode:
                break
            pos = taken
        self.buffer = self.buffer[pos:]


def line_owner(max_length: int = 20) -> Owner:
    owner = Owner()
    owner._mode = LineMode(
        owner,
        lambda owner, line: owner.events.append(("line", line)),
        lambda owner, line: owner.events.append(("too long", line)),
        max_length,
    )
    return owner


def pieces(data: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted(set(points)), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


STREAM = b"NOOP\r\nbare\nlf\r\nbare\rcr\r\n" + b"x" * 50 + b"\r\nQUIT\r\n\r\n"


class TestLineMode:
    def test_lines_split_on_crlf_only(self) -> None:
        """Only CRLF ends a line; a bare CR or LF stays inside it."""
        owner = line_owner(max_length=100)
        owner.feed(b"a\r\nb\nc\r\nd\re\r\npartial")
        assert [
            ("line", b"a"),
            ("line", b"b\nc"),
            ("line", b"d\re"),
        ] == owner.events
        assert b"partial" == owner.buffer

    def test_over_long_complete_line(self) -> None:
        """A complete line over max_length goes to too_long, whole."""
        owner = line_owner()
        owner.feed(b"y" * 21 + b"\r\nok\r\n")
        assert [("too long", b"y" * 21), ("line", b"ok")] == owner.events

    def test_over_long_partial_line_is_dropped_to_its_crlf(self) -> None:
        """A partial line over max_length is reported once, then dropped to CRLF."""
        owner = line_owner()
        owner.feed(b"z" * 30)
        assert isinstance(owner._mode, DiscardLine)
        owner.feed(b"z" * 30 + b"\r")
        owner.feed(b"\nok\r\n")
        assert [("too long", b"z" * 30), ("line", b"ok")] == owner.events
        assert isinstance(owner._mode, LineMode)

    @given(st.lists(st.integers(1, len(STREAM) - 1), max_size=20))
    def test_split_anywhere(self, points: list[int]) -> None:
        """Lines come out the same wherever the reads are cut."""
        whole = line_owner()
        whole.feed(STREAM)
        split = line_owner()
        for piece in pieces(STREAM, points):
            split.feed(piece)
        # A split over-long line is reported with only the part seen so far.
        assert [e[0] for e in whole.events] == [e[0] for e in split.events]
        assert [e for e in whole.events if e[0] == "line"] == [
            e for e in split.events if e[0] == "line"
        ]

    def test_stops_when_the_owner_waits(self) -> None:
        """After a line that makes the owner wait, the next ones stay unread."""
        owner = Owner()

        def deliver(owner: Owner, line: bytes) -> None:
            owner.events.append(line)
            owner._waits = 1

        owner._mode = LineMode(owner, deliver, deliver, 100)
        owner.feed(b"one\r\ntwo\r\n")
        assert [b"one"] == owner.events
        assert b"two\r\n" == owner.buffer
        assert 5 == owner._pos

    def test_many_short_lines_in_one_read(self) -> None:
        """100,000 one-byte lines in one read are all delivered, in one call."""
        owner = line_owner()
        count = 0

        def deliver(owner: Owner, line: bytes) -> None:
            nonlocal count
            count += 1

        owner._mode = LineMode(owner, deliver, deliver, 20)
        owner.feed(b"x\r\n" * 100_000)
        assert 100_000 == count


class TestBodyModes:
    def test_data_mode_hands_back_the_rest(self) -> None:
        """DATA ends at CRLF.CRLF; the bytes after it are left for line mode."""
        owner = Owner()
        body = []
        ends = []

        def done(reader: DataReader) -> None:
            ends.append(reader.size)
            owner._mode = RawMode(owner, lambda data: owner.events.append(data))

        owner._mode = DataMode(body.append, done)
        owner.feed(b"..a\r\nb\r\n.\r\nNEXT")
        assert [b".a\r\nb\r\n"] == [b"".join(body)]
        assert [7] == ends
        assert [b"NEXT"] == owner.events

    def test_data_mode_starts_as_a_new_reader(self) -> None:
        """DataMode sets up its reader part inline: every slot of a new
        DataReader, with the same values (a slot added there must be here)."""
        for max_size in (0, 1000):
            mode, reader = DataMode(print, print, None, max_size), DataReader(max_size)
            for slot in DataReader.__slots__:
                assert getattr(reader, slot) == getattr(mode, slot), slot

    def test_data_mode_write_failure_drops_the_rest(self) -> None:
        """A write that raises calls failed() once, inside the handler; the
        rest of the body is read and dropped and done() still runs."""
        owner = Owner()
        calls: list[bytes] = []
        failures: list[BaseException] = []
        ends: list[int] = []

        def write(data: bytes) -> None:
            calls.append(data)
            raise RuntimeError("receiver broke")

        def failed() -> None:
            failures.append(sys.exc_info()[1])  # type: ignore[arg-type]

        def done(reader: DataReader) -> None:
            ends.append(reader.size)
            owner._mode = RawMode(owner, lambda data: owner.events.append(data))

        owner._mode = DataMode(write, done, failed)
        for piece in (b"line one\r\n", b"line two\r\n", b".\r\nNEXT"):
            owner.feed(piece)
        assert 1 == len(calls) and 1 == len(failures)
        assert isinstance(failures[0], RuntimeError)
        assert [20] == ends
        assert [b"NEXT"] == owner.events

    @given(st.lists(st.integers(1, 29), max_size=10))
    def test_chunks_take_exactly_their_size(self, points: list[int]) -> None:
        """A chunk mode takes its bytes and no more, however the reads are cut."""
        stream = b"0123456789" + b"abcdefghij" + b"rest-of-it"
        for piece_points in (points, []):
            owner, kept, done = self._chunk_owner()
            for piece in pieces(stream, piece_points):
                owner.feed(piece)
            assert b"0123456789abcdefghij" == b"".join(kept)
            assert [True] == done
            assert b"rest-of-it" == b"".join(owner.events)

    @staticmethod
    def _chunk_owner() -> tuple[Owner, list, list]:
        owner, kept, done = Owner(), [], []

        def finished() -> None:
            done.append(True)
            owner._mode = RawMode(owner, owner.events.append)

        owner._mode = ChunkMode(20, kept.append, finished)
        return owner, kept, done

    def test_dropped_chunk(self) -> None:
        """A chunk with no writer is read and dropped."""
        owner = Owner()
        done = []
        owner._mode = ChunkMode(3, None, lambda: done.append(owner._pos))
        owner.feed(b"ab")
        owner.feed(b"c")
        assert 1 == len(done)
        assert b"" == owner.buffer

    def test_raw_mode_gets_everything(self) -> None:
        """Raw mode passes each read on whole and records the position."""
        owner = Owner()
        owner._mode = RawMode(owner, owner.events.append)
        owner.feed(b"abc")
        owner.feed(b"\r\ndef")
        assert [b"abc", b"\r\ndef"] == owner.events
        assert 5 == owner._pos
