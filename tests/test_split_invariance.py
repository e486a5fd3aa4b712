"""Where the network cuts the byte stream never changes what the server does.

One scripted session (DATA with dot-stuffing, BDAT chunks, over-long lines,
RSET, AUTH with a continuation, a refused STARTTLS, pipelining) is fed whole,
byte by byte, and cut at random points; the replies and the stored messages
must be identical every time.  With asynchronous hooks the held-input path is
exercised too.
"""

from __future__ import annotations

from base64 import b64encode

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from twisted_smtpd import SMTPError, SMTPFactory
from twisted_smtpd.auth import AuthPolicy
from twisted_smtpd.testing import connect


def _b64(data: bytes) -> bytes:
    return b64encode(data)


SCRIPT = b"".join(
    [
        b"EHLO client.example\r\n",
        b"STARTTLS\r\n",  # not offered: 502
        b"AUTH PLAIN " + _b64(b"\0alice\0wrong") + b"\r\n",
        b"AUTH LOGIN\r\n",
        _b64(b"alice") + b"\r\n",
        _b64(b"secret") + b"\r\n",
        b"NOOP " + b"x" * 600 + b"\r\n",  # over the command line limit
        b"Y" * 13000 + b"\r\n",  # over any buffer: discarded to its CRLF
        b"MAIL FROM:<a@example.org>\r\n",
        b"RCPT TO:<b@example.net>\r\n",
        b"RCPT TO:<nobody@example.net>\r\n",
        b"DATA\r\n",
        b"Subject: one\r\n\r\n..stuffed\r\n..\r\n...three\r\nlast\n.\r\n.\r\n",
        b"MAIL FROM:<c@example.org>\r\n",
        b"RSET\r\n",
        b"MAIL FROM:<d@example.org>\r\n",
        b"RCPT TO:<e@example.net>\r\n",
        b"BDAT 11\r\n",
        b"two\r\n.\r\nbin",
        b"BDAT 6 LAST\r\n",
        b"ary\r\n\x00",
        b"NOOP\r\n",
        b"MAIL FROM:<f@example.org>\r\n",
        b"RCPT TO:<g@example.net>\r\n",
        b"DATA\r\n",
        b"three\r\n.\r\n",
        b"QUIT\r\n",
    ]
)


class Handler:
    """Stores messages; answers each hook now or through the clock."""

    def __init__(self, clock: Clock, later: bool) -> None:
        self.clock = clock
        self.later = later
        self.stored: list[tuple[str, list[str], bytes]] = []

    def _answer(self, value: object = None) -> object:
        if not self.later:
            return value
        d: Deferred[object] = Deferred()
        self.clock.callLater(0, d.callback, value)
        return d

    def check_sender(self, envelope):
        return self._answer()

    def check_recipient(self, envelope, address, options):
        if address.startswith("nobody@"):
            raise SMTPError(550, "5.1.1", "No such user here")
        return self._answer()

    def handle_message(self, envelope):
        self.stored.append(
            (envelope.mail_from, list(envelope.rcpt_tos), envelope.content)
        )
        return self._answer(f"Q{len(self.stored)}")


def _drain(clock: Clock) -> None:
    """Run every call due now (the hooks' answers), however many there are."""
    while any(call.getTime() <= clock.seconds() for call in clock.getDelayedCalls()):
        clock.advance(0)


def run(pieces: list[bytes], later: bool) -> tuple[bytes, list, bool]:
    clock = Clock()
    users = InMemoryUsernamePasswordDatabaseDontUse()
    users.addUser(b"alice", b"secret")
    auth = AuthPolicy.from_checkers([users], allow_without_tls=True, failure_delay=0)
    handler = Handler(clock, later)
    factory = SMTPFactory(handler, hostname="mx.test", reactor=clock, auth=auth)
    client = connect(factory)
    for piece in pieces:
        client.send(piece)
        _drain(clock)
    return client.transport.value(), handler.stored, client.closed


def _cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted(set(points)), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def test_the_script_does_what_it_should() -> None:
    """Fed whole, the script gets the expected replies and stores three messages."""
    output, stored, closed = run([SCRIPT], later=False)
    codes = [line[:4] for line in output.split(b"\r\n") if line[3:4] == b" "]
    assert [
        b"220 ",
        b"250 ",  # EHLO
        b"502 ",  # STARTTLS not offered
        b"535 ",
        b"334 ",
        b"334 ",
        b"235 ",
        b"500 ",
        b"500 ",
        b"250 ",
        b"250 ",
        b"550 ",
        b"354 ",
        b"250 ",  # queued Q1
        b"250 ",
        b"250 ",  # RSET
        b"250 ",
        b"250 ",
        b"250 ",  # BDAT 11
        b"250 ",  # queued Q2
        b"250 ",  # NOOP
        b"250 ",
        b"250 ",
        b"354 ",
        b"250 ",  # queued Q3
        b"221 ",
    ] == codes
    assert [
        (
            "a@example.org",
            ["b@example.net"],
            b"Subject: one\r\n\r\n.stuffed\r\n.\r\n..three\r\nlast\n.\r\n",
        ),
        ("d@example.org", ["e@example.net"], b"two\r\n.\r\nbinary\r\n\x00"),
        ("f@example.org", ["g@example.net"], b"three\r\n"),
    ] == stored
    assert output.endswith(b"221 2.0.0 Bye\r\n")
    assert b"250 2.0.0 OK: queued as Q2\r\n" in output
    assert closed


def test_byte_by_byte() -> None:
    """One byte per read gives the same replies and messages as one read."""
    whole = run([SCRIPT], later=False)
    pieces = [SCRIPT[i : i + 1] for i in range(len(SCRIPT))]
    assert whole == run(pieces, later=False)


def test_byte_by_byte_with_async_hooks() -> None:
    """Byte by byte with hooks answered through the clock: same again."""
    assert run([SCRIPT], later=True) == run(
        [SCRIPT[i : i + 1] for i in range(len(SCRIPT))], later=True
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=len(SCRIPT) - 1), max_size=40),
    st.booleans(),
)
def test_random_splits(points: list[int], later: bool) -> None:
    """Cut anywhere, the session's replies and stored content are unchanged."""
    assert run([SCRIPT], later) == run(_cut(SCRIPT, points), later)


def test_async_hooks_change_nothing() -> None:
    """Hooks answered later give the same dialogue as hooks answered at once."""
    assert run([SCRIPT], later=False) == run([SCRIPT], later=True)
