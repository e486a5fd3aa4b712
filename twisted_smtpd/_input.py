# -*- test-case-name: tests.test_input -*-
"""
Input modes: where the next received bytes go.

A session's input is always in exactly one mode: command lines, the rest of
an over-long line being dropped, SASL answers, a DATA body, a BDAT chunk, or
raw bytes for a subclass.  Which one is a single datum, the protocol's
C{_mode}, replaced on every transition; no flag per feature.

Each mode is a small slotted object whose C{consume(buffer, pos)} takes bytes
from C{buffer} starting at C{pos} and returns the position after what it
took.  Complexity goal (as in h11's C{_receivebuffer.py}): a read holding
many short items (pipelined commands, tiny BDAT chunks) costs O(n) in its
length.  Nothing re-slices the tail of the buffer per item: a line is one
C{find} and one slice of the line itself; a chunk is one slice of the chunk.
A client that packs 64 KiB of one-byte lines into one read would otherwise
make the server copy ~2 GiB.  The DATA reader takes the tail once per
message, when the body begins.

A mode stops as soon as its owner's C{_mode} is no longer itself or its
owner's C{_waits} is non-zero (a hook is pending, the caller paused, the
buffer was replaced, the connection closed), so the owner decides with one
check per item.  Modes that call back into code which may replace the
buffer (C{lineReceived}, C{rawDataReceived}) store the position reached in
C{owner._pos} first.

This module imports nothing from Twisted.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from ._data import DataReader

__all__ = ["LineMode", "DiscardLine", "DataMode", "ChunkMode", "RawMode", "DROP"]

_CRLF = b"\r\n"


class LineMode:
    """CRLF-terminated lines, each to C{deliver}; bare CR or LF never ends one.

    A line longer than C{max_length} (CRLF not counted) goes to C{too_long}
    instead.  Both are called as C{f(owner, line)}: the protocol's own
    functions (C{type(protocol).lineReceived}), so an idle session holds no
    bound method.  If it has no CRLF yet, the owner is first switched to a
    L{DiscardLine} that drops the rest of it and then returns here.
    """

    __slots__ = ("_owner", "_deliver", "_too_long", "max_length")
    #: whether closing the connection in this mode would lose work
    busy = False

    def __init__(
        self,
        owner: Any,
        deliver: Callable[[Any, bytes], Any],
        too_long: Callable[[Any, bytes], Any],
        max_length: int,
    ) -> None:
        self._owner = owner
        self._deliver = deliver
        self._too_long = too_long
        self.max_length = max_length

    def consume(self, buffer: bytes, pos: int) -> int:
        owner = self._owner
        deliver = self._deliver
        max_length = self.max_length
        size = len(buffer)
        while True:
            end = buffer.find(_CRLF, pos)
            if end < 0:
                if size - pos > max_length:
                    line = buffer[pos:]
                    # Keep a trailing CR: it may begin the CRLF.
                    pos = size - 1 if line.endswith(b"\r") else size
                    owner._pos = pos
                    owner._set_mode(DiscardLine(self))
                    self._too_long(owner, line)
                return pos
            line = buffer[pos:end]
            if end - pos > max_length:
                pos = owner._pos = end + 2
                self._too_long(owner, line)
            else:
                pos = owner._pos = end + 2
                deliver(owner, line)
            if pos >= size or owner._waits or owner._mode is not self:
                return pos


class DiscardLine:
    """Drop bytes up to and including the next CRLF, then go back to C{after}."""

    __slots__ = ("_after",)
    busy = False

    def __init__(self, after: Any) -> None:
        self._after = after

    def consume(self, buffer: bytes, pos: int) -> int:
        end = buffer.find(_CRLF, pos)
        if end < 0:
            return len(buffer) - 1 if buffer.endswith(b"\r") else len(buffer)
        self._after._owner._set_mode(self._after)
        return end + 2


class DataMode(DataReader):
    """The DATA body, until C{<CRLF>.<CRLF>}: a L{DataReader} that is also the mode.

    One object per message, not a reader and a mode around it: one
    allocation and one indirection less per message and per read.

    C{write} gets the unstuffed body; C{done(mode)} runs once the end
    marker is in (the mode is the reader: C{size}, C{too_big}), with the
    owner's mode still this one (it switches).  With C{failed}, a C{write}
    that raises calls C{failed()} inside the handler (so it can capture the
    exception) and the rest of the body is read and dropped; without it the
    exception propagates.
    """

    __slots__ = ("_write", "_done", "_failed")
    busy = True

    def __init__(
        self,
        write: Callable[[bytes], Any],
        done: Callable[[DataReader], Any],
        failed: Optional[Callable[[], Any]] = None,
        max_size: int = 0,
    ) -> None:
        # DataReader.__init__, inline (once per message)
        self._pending = b"\r\n"
        self._skip = 2
        self.max_size = max_size
        self.size = 0
        self.too_big = False
        self.done = False
        self._write: Optional[Callable[[bytes], Any]] = write
        self._done = done
        self._failed = failed

    def consume(self, buffer: bytes, pos: int) -> int:
        # The reader works on whole reads: the tail is sliced once per read
        # of the body, not per line.
        body, end = self.take(buffer[pos:] if pos else buffer)
        if body and self._write is not None:
            if self._failed is None:
                self._write(body)
            else:
                try:
                    self._write(body)
                except Exception:
                    self._write = None
                    self._failed()
        if end < 0:
            return len(buffer)
        self._done(self)
        return pos + end


class ChunkMode:
    """The next C{left} bytes (a BDAT chunk): to C{write}, or dropped if None.

    C{done()} runs once the last byte is taken.
    """

    __slots__ = ("left", "_write", "_done")
    busy = True

    def __init__(
        self,
        size: int,
        write: Optional[Callable[[bytes], Any]],
        done: Callable[[], Any],
    ) -> None:
        self.left = size
        self._write = write
        self._done = done

    def consume(self, buffer: bytes, pos: int) -> int:
        size = len(buffer)
        end = pos + self.left
        if end > size:
            end = size
        if self._write is not None:
            self._write(buffer if pos == 0 and end == size else buffer[pos:end])
        self.left -= end - pos
        if not self.left:
            self._done()
        return end


class RawMode:
    """Everything to C{deliver} (C{rawDataReceived}) until the owner switches."""

    __slots__ = ("_owner", "_deliver")
    busy = True

    def __init__(self, owner: Any, deliver: Callable[[bytes], Any]) -> None:
        self._owner = owner
        self._deliver = deliver

    def consume(self, buffer: bytes, pos: int) -> int:
        self._owner._pos = len(buffer)
        self._deliver(buffer[pos:] if pos else buffer)
        return len(buffer)


class _Drop:
    """After the connection is gone: bytes are dropped.

    It holds no reference to the protocol, so switching to it breaks the
    protocol -> mode -> protocol cycle and a closed session is freed by
    reference counting, not left to the cyclic garbage collector.
    """

    __slots__ = ()
    busy = False

    def consume(self, buffer: bytes, pos: int) -> int:
        return len(buffer)


DROP = _Drop()
