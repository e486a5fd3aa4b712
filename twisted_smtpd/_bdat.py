# -*- test-case-name: tests.test_bdat -*-
"""
BDAT (RFC 3030): a message in chunks of a stated size.

The client sends each chunk whatever the answer to its BDAT, so a chunk is
always read by its size (a L{ChunkMode}) and kept or dropped, never parsed
as commands.  A L{ChunkedMessage} is the message in flight for BDAT: the
sizes so far against the limit and whether the LAST chunk came.  Once it is
over the limit, or the receiver failed, its remaining chunks are read and
dropped, and the message is answered at the end of that chunk.

Nothing here imports Twisted; the protocol is passed in (its input modes).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

from ._delivery import Message
from ._input import ChunkMode
from .replies import R250_CHUNK_OK, R501_SYNTAX_BDAT, SMTPError, fill

__all__ = ["ChunkedMessage", "bdat_argument", "drop_chunk"]


def bdat_argument(argument: str) -> tuple[int, bool]:
    """C{size [LAST]} -> (size, last); 501 5.5.4 if malformed."""
    parts = argument.split()
    if (
        not 1 <= len(parts) <= 2
        or not parts[0].isdigit()
        or len(parts[0]) > 18
        or (len(parts) == 2 and parts[1].upper() != "LAST")
    ):
        raise SMTPError(R501_SYNTAX_BDAT)
    return int(parts[0]), len(parts) == 2


def drop_chunk(protocol: Any, size: int) -> None:
    """Read the next C{size} bytes and drop them (a refused BDAT's chunk)."""
    if size:
        mode = ChunkMode(size, None, partial(protocol._set_mode, protocol._lines))
        protocol._set_mode(mode, protocol.limits.data_timeout)


class ChunkedMessage(Message):
    """A message sent with BDAT, from its first chunk to its end of data."""

    __slots__ = ("too_big", "last", "chunk_size")

    def __init__(self, receiver: Any, envelope: Any, owner: Any) -> None:
        super().__init__(receiver, envelope, owner)
        #: the message went over the size limit (its chunks are dropped)
        self.too_big = False
        #: the chunk being read is the LAST one, and its size
        self.last = False
        self.chunk_size = 0

    def add_chunk(self, size: int, last: bool, limit: int) -> None:
        """C{size} more bytes are coming; over C{limit} the rest drops."""
        envelope = self.envelope
        envelope.size += size
        if limit and envelope.size > limit:
            self.too_big = True
        self.chunk_size, self.last = size, last

    def read_chunk(
        self,
        protocol: Any,
        size: int,
        last: bool,
        writer: Callable[[Message], Optional[Callable[[bytes], None]]],
    ) -> None:
        """C{BDAT size [LAST]} accepted: read the chunk, to C{writer(self)}."""
        self.add_chunk(size, last, protocol.limits.max_message_size)
        if not size:
            self._chunk_read(protocol)
            if not last:
                protocol._junk()  # an empty chunk moves no mail
            return
        write = None if self.too_big or self.failure else writer(self)
        done = partial(self._chunk_read, protocol)
        protocol._set_mode(ChunkMode(size, write, done), protocol.limits.data_timeout)

    def _chunk_read(self, protocol: Any) -> None:
        protocol._set_mode(protocol._lines)
        if self.too_big or self.last or self.failure is not None:
            self.end_of_data(self.envelope.size, self.too_big)
        else:
            protocol.reply(fill(R250_CHUNK_OK, size=self.chunk_size))
