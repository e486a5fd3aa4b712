"""Protocol fuzzing: any input gets well-formed replies; nothing escapes."""

from __future__ import annotations

import re
from base64 import b64encode

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet.task import Clock

from twisted_smtpd import Limits, SMTPError, SMTPFactory
from twisted_smtpd.auth import AuthPolicy
from twisted_smtpd.testing import connect
from twisted_smtpd.tls import TLSPolicy

REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][^\r\n]*\Z")
QUEUED = re.compile(rb"250 (2\.0\.0 )?OK: queued as ")

LINES = [
    b"EHLO c.example",
    b"HELO c.example",
    b"EHLO",
    b"MAIL FROM:<a@b.example>",
    b"MAIL FROM:<> SIZE=100 BODY=8BITMIME",
    b"MAIL FROM:<a@b.example> SIZE=99999999999",
    b'MAIL FROM:<"q u"@[127.0.0.1]> SMTPUTF8',
    b"RCPT TO:<c@d.example>",
    b"RCPT TO:<reject@d.example>",
    b"RCPT TO:<crash@d.example>",
    b"RCPT TO:<postmaster>",
    b"DATA",
    b"BDAT 5",
    b"BDAT 3 LAST",
    b"BDAT 0 LAST",
    b"BDAT 300 LAST",
    b"hello",
    b".",
    b"..dot",
    b"RSET",
    b"NOOP",
    b"VRFY x",
    b"HELP",
    b"STARTTLS",
    b"AUTH PLAIN " + b64encode(b"\0alice\0secret"),
    b"AUTH PLAIN " + b64encode(b"\0alice\0wrong"),
    b"AUTH LOGIN",
    b"*",
    b"QUIT",
    b"\xff\xfe\x00",
    b"X" * 600,
]


def chunks():
    piece = st.one_of(
        st.sampled_from(LINES).map(lambda line: line + b"\r\n"),
        st.sampled_from([b"\r", b"\n", b".\n", b"\r\n.\r\n", b"\n.\r\n"]),
        st.binary(max_size=40),
    )
    return st.lists(piece, max_size=40).flatmap(
        lambda pieces: st.tuples(
            st.just(b"".join(pieces)),
            st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20),
        )
    )


class Picky:
    """A handler that accepts, refuses and crashes depending on the input."""

    def __init__(self):
        self.stored = 0

    def check_recipient(self, envelope, address, options):
        if address.startswith("reject@"):
            raise SMTPError(550, "5.1.1", "No such user")
        if address.startswith("crash@"):
            raise RuntimeError("handler bug")

    def handle_message(self, envelope):
        if b"crash" in envelope.content:
            raise RuntimeError("handler bug")
        self.stored += 1


def make_factory(handler, certificates):
    db = InMemoryUsernamePasswordDatabaseDontUse()
    db.addUser(b"alice", b"secret")
    return SMTPFactory(
        handler,
        hostname="mx.test",
        reactor=Clock(),
        limits=Limits(max_message_size=200, max_bad_commands=15, max_recipients=3),
        tls=TLSPolicy.from_files(str(certificates["cert"]), str(certificates["key"])),
        auth=AuthPolicy.from_checkers([db], allow_without_tls=True, failure_delay=0),
    )


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=chunks())
def test_any_input_gets_well_formed_replies(certificates, data) -> None:
    """No exception escapes; every reply line is well formed; 250s match storage."""
    stream, sizes = data
    handler = Picky()
    client = connect(make_factory(handler, certificates))
    position = 0
    index = 0
    while position < len(stream) and not client.closed:
        size = sizes[index % len(sizes)]
        client.send(stream[position : position + size])
        position += size
        index += 1
    output = client.transport.value()
    assert output.endswith(b"\r\n")
    lines = output[:-2].split(b"\r\n")
    for line in lines:
        assert REPLY_LINE.match(line), line
    queued = sum(1 for line in lines if QUEUED.match(line))
    assert handler.stored == queued
