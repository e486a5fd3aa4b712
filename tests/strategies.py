"""Hypothesis strategies shared by the tests of the pure modules."""

from __future__ import annotations

import string

from hypothesis import strategies as st

# -- addresses (RFC 5321 4.1.2) ------------------------------------------------
_ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
_LET_DIG = string.ascii_letters + string.digits

atoms = st.text(alphabet=_ATEXT, min_size=1, max_size=10)

#: dot-string local parts: atoms joined by single dots
dot_strings = st.lists(atoms, min_size=1, max_size=4).map(".".join)


labels = st.tuples(
    st.text(alphabet=_LET_DIG, min_size=1, max_size=1),
    st.text(alphabet=_LET_DIG + "-", max_size=8),
    st.text(alphabet=_LET_DIG, max_size=1),
).map(lambda p: p[0] + (p[1] + p[2] if p[2] else ""))

#: ASCII domains: labels that start and end with a letter or digit
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)

_QTEXT = "".join(chr(c) for c in range(0x20, 0x7F))


def quote_local_part(text: str) -> str:
    """Quote C{text} as an RFC 5321 Quoted-string, escaping DQUOTE and backslash."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


#: Quoted-string local parts of printable ASCII (spaces, quotes, backslashes...)
quoted_local_parts = st.text(alphabet=_QTEXT, max_size=25).map(quote_local_part)

#: valid ASCII mailboxes (dot-string or quoted local part, domain name)
mailboxes = st.builds(
    lambda local, domain: f"{local}@{domain}",
    st.one_of(dot_strings, quoted_local_parts),
    domains,
)

# -- DATA ------------------------------------------------------------------------
#: bytes weighted towards the ones that matter to framing and dot-stuffing
_PIECES = [
    b"\r\n",
    b".",
    b"\r",
    b"\n",
    b"..",
    b"\r\n.",
    b"\r\n.\r",
    b"x",
    b"\xff",
    b"\x00",
]

framing_bytes = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(_PIECES), max_size=60).map(b"".join),
)

#: message bodies as the client means them: empty or ending with CRLF
messages = st.one_of(st.just(b""), framing_bytes.map(lambda body: body + b"\r\n"))


def dot_stuff(message: bytes) -> bytes:
    """Reference dot-stuffing (RFC 5321 4.5.2), line by line.

    C{message} is empty or ends with CRLF; every line that begins with a
    period gets one more.
    """
    lines = message.split(b"\r\n")
    return b"\r\n".join(
        b"." + line if line.startswith(b".") else line for line in lines
    )


def transmission(message: bytes, after: bytes = b"") -> bytes:
    """What a client sends after 354: the stuffed message, the end marker, more."""
    return dot_stuff(message) + b".\r\n" + after


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """C{data} split at arbitrary points, empty chunks included."""
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=12))
    cuts = sorted(cuts)
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]
