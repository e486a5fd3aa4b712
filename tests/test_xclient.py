"""XCLIENT (Postfix XCLIENT_README): parsing and the allow-list."""

from __future__ import annotations

import pytest

from twisted_smtpd._xclient import (
    UNKNOWN,
    AddressList,
    XClientUpdate,
    parse_xclient,
    xtext_decode,
)
from twisted_smtpd.replies import SMTPError


class TestParse:
    def test_all_attributes(self) -> None:
        update = parse_xclient(
            "NAME=spike.example.org ADDR=192.0.2.7 PORT=4711 PROTO=esmtp"
            " HELO=spike.example.org LOGIN=wietse DESTADDR=IPV6:2001:db8::25"
            " DESTPORT=25"
        )
        assert update == XClientUpdate(
            name="spike.example.org",
            addr="192.0.2.7",
            port=4711,
            proto="ESMTP",
            helo="spike.example.org",
            login="wietse",
            dest_addr="2001:db8::25",
            dest_port=25,
        )

    def test_names_case_insensitive_and_last_wins(self) -> None:
        update = parse_xclient("addr=192.0.2.1 Addr=192.0.2.2")
        assert "192.0.2.2" == update.addr
        assert update.name is None  # not sent

    def test_unavailable_values(self) -> None:
        update = parse_xclient(
            "NAME=[tempunavail] ADDR=[UNAVAILABLE] PORT=[Unavailable]"
            " HELO=[UNAVAILABLE] LOGIN=[UNAVAILABLE] DESTADDR=[UNAVAILABLE]"
            " DESTPORT=[UNAVAILABLE]"
        )
        assert (UNKNOWN, True) == (update.name, update.name_temporary)
        assert (UNKNOWN, 0, "", "") == (
            update.addr,
            update.port,
            update.helo,
            update.login,
        )
        assert (UNKNOWN, 0) == (update.dest_addr, update.dest_port)
        assert not parse_xclient("NAME=[UNAVAILABLE]").name_temporary

    def test_ipv6_forms(self) -> None:
        assert "2001:db8::1" == parse_xclient("ADDR=IPv6:2001:DB8:0::1").addr
        assert "2001:db8::1" == parse_xclient("ADDR=2001:db8::1").addr
        assert "192.0.2.1" == parse_xclient("ADDR=IPV6:::ffff:192.0.2.1").addr

    def test_xtext(self) -> None:
        assert "a b+c" == xtext_decode("a+20b+2Bc")
        assert "x y" == parse_xclient("LOGIN=x+20y").login
        # Header-breaking characters in HELO are neutered, control chars masked.
        assert "a?b?c" == parse_xclient("HELO=a+3Cb+0Dc").helo

    @pytest.mark.parametrize(
        "argument, text",
        [
            ("", "Syntax: XCLIENT attribute=value..."),
            ("ADDR", "XCLIENT attribute=value expected"),
            ("ADDR=", "XCLIENT attribute=value expected"),
            ("FOO=bar", "Bad XCLIENT attribute name: FOO"),
            ("ADDR=999.1.1.1", "Bad ADDR syntax: 999.1.1.1"),
            ("ADDR=IPV6:192.0.2.1", "Bad ADDR syntax: IPV6:192.0.2.1"),
            ("ADDR=[192.0.2.1]", "Bad ADDR syntax: [192.0.2.1]"),
            ("DESTADDR=host", "Bad DESTADDR syntax: host"),
            ("PORT=65536", "Bad PORT syntax: 65536"),
            ("PORT=-1", "Bad PORT syntax: -1"),
            ("DESTPORT=2x", "Bad DESTPORT syntax: 2x"),
            ("PROTO=LMTP", "Bad PROTO syntax: LMTP"),
            ("NAME=bad_name!", "Bad NAME syntax: bad_name!"),
            ("NAME=192.0.2.1", "Bad NAME syntax: 192.0.2.1"),
            ("NAME=-a.example", "Bad NAME syntax: -a.example"),
            ("LOGIN=a+zz", "Bad LOGIN syntax: a+zz"),
            ("HELO=" + "a" * 256, "XCLIENT attribute value too long"),
        ],
    )
    def test_errors_are_501_554(self, argument: str, text: str) -> None:
        with pytest.raises(SMTPError) as caught:
            parse_xclient(argument)
        reply = caught.value.reply
        assert (501, "5.5.4", text) == (reply.code, reply.enhanced, reply.text)


class TestAddressList:
    def test_matches(self) -> None:
        allowed = AddressList(["127.0.0.0/8", "2001:db8::/32", "192.0.2.5"])
        assert "127.1.2.3" in allowed
        assert "::ffff:127.0.0.1" in allowed
        assert "2001:db8:1::1" in allowed
        assert "192.0.2.5" in allowed
        assert "192.0.2.6" not in allowed
        assert "unknown" not in allowed
        assert "::1" not in allowed

    def test_empty_allows_nobody(self) -> None:
        assert not AddressList()
        assert "127.0.0.1" not in AddressList()

    @pytest.mark.parametrize("bad", ["10.0.0.1/8", "nonsense", "10.0.0.0/33"])
    def test_bad_entries(self, bad: str) -> None:
        with pytest.raises(ValueError, match="bad network"):
            AddressList([bad])
