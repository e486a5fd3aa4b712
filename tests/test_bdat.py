"""BDAT's pieces without a connection: the argument and the chunk bookkeeping."""

from __future__ import annotations

import pytest

from twisted_smtpd._bdat import ChunkedMessage, bdat_argument
from twisted_smtpd.replies import SMTPError

from .test_delivery import Consumer, Owner, envelope


class TestArgument:
    @pytest.mark.parametrize(
        "argument, expected",
        [("0", (0, False)), ("42 LAST", (42, True)), ("7 last", (7, True))],
    )
    def test_valid(self, argument: str, expected: tuple[int, bool]) -> None:
        """A size, and LAST in any case."""
        assert expected == bdat_argument(argument)

    @pytest.mark.parametrize(
        "argument", ["", "x", "-1", "1 2", "1 LAST x", "1" * 19, "1 FIRST"]
    )
    def test_malformed(self, argument: str) -> None:
        """Anything else is 501 5.5.4 (the chunk size is then unknown)."""
        with pytest.raises(SMTPError) as raised:
            bdat_argument(argument)
        assert (501, "5.5.4") == (raised.value.reply.code, raised.value.reply.enhanced)


class TestChunkedMessage:
    def test_chunks_over_the_limit(self) -> None:
        """BDAT sizes add up; past the limit the message is too big."""
        message = ChunkedMessage(Consumer(), envelope(), Owner())
        message.add_chunk(5, False, limit=8)
        assert (5, False, False) == (
            message.envelope.size,
            message.too_big,
            message.last,
        )
        message.add_chunk(4, True, limit=8)
        assert (9, True, True, 4) == (
            message.envelope.size,
            message.too_big,
            message.last,
            message.chunk_size,
        )

    def test_no_limit(self) -> None:
        """A zero limit never makes a message too big."""
        message = ChunkedMessage(Consumer(), envelope(), Owner())
        message.add_chunk(10**12, True, limit=0)
        assert not message.too_big
