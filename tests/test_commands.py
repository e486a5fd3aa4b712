"""Tests for L{twisted_smtpd._commands}: command lines, paths and ESMTP parameters."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import domains, dot_strings, mailboxes, quoted_local_parts
from twisted_smtpd._commands import (
    MAIL_PARAMETERS,
    MAX_LOCAL_PART,
    MAX_PATH,
    Command,
    decode_line,
    parse_address,
    parse_command,
    parse_helo,
    parse_mail,
    parse_parameters,
    parse_rcpt,
    split_command,
)
from twisted_smtpd.replies import (
    R501_BAD_RECIPIENT,
    R501_BAD_SENDER,
    R501_SYNTAX_HELO,
    R501_SYNTAX_MAIL,
    R501_SYNTAX_RCPT,
    R553_NEEDS_SMTPUTF8,
    Reply,
    SMTPError,
)


def mail_error(argument: str) -> Reply:
    """The reply parse_mail refuses C{argument} with."""
    with pytest.raises(SMTPError) as info:
        parse_mail(argument)
    return info.value.reply


def rcpt_error(argument: str, smtputf8: bool = False) -> Reply:
    """The reply parse_rcpt refuses C{argument} with."""
    with pytest.raises(SMTPError) as info:
        parse_rcpt(argument, smtputf8)
    return info.value.reply


def bad_parameter(name: str) -> Reply:
    return Reply(501, "5.5.4", f"Bad value for parameter {name}")


def unknown_parameter(name: str) -> Reply:
    return Reply(555, "5.5.4", f"Parameter {name} not recognized")


def label(length: int, char: str = "a") -> str:
    return char * length


def domain_of_length(length: int) -> str:
    """An ASCII domain name of exactly C{length} characters, labels of <= 63."""
    labels = []
    remaining = length
    while remaining > 0:
        size = min(63, remaining)
        if remaining - size == 1:  # avoid a trailing empty label
            size -= 1
        labels.append("d" * size)
        remaining -= size + 1
    domain = ".".join(labels)
    assert length == len(domain)
    return domain


INVALID_UTF8 = b"\xff\xfe".decode("utf-8", "surrogateescape")


class TestDecodeLine:
    """Bytes from the wire to text."""

    def test_ascii(self) -> None:
        """ASCII decodes as is."""
        assert "MAIL FROM:<a@b>" == decode_line(b"MAIL FROM:<a@b>")

    def test_utf8(self) -> None:
        """Valid UTF-8 decodes to the characters it encodes."""
        assert "RCPT TO:<jörg@bücher.example>" == decode_line(
            "RCPT TO:<jörg@bücher.example>".encode()
        )

    def test_invalid_utf8_survives(self) -> None:
        """Invalid UTF-8 becomes surrogates that encode back to the same bytes."""
        line = b"EHLO h\xffst\xc3"
        text = decode_line(line)
        assert line == text.encode("utf-8", "surrogateescape")


class TestParseCommand:
    """Splitting a command line into verb and argument."""

    @pytest.mark.parametrize(
        "line, expected",
        [
            (b"NOOP", Command("NOOP", "")),
            (b"noop", Command("NOOP", "")),
            (b"MaIl FROM:<a@b.example>", Command("MAIL", "FROM:<a@b.example>")),
            (b"EHLO   mx.example  ", Command("EHLO", "mx.example")),
            (b"RCPT TO:<a@b>  X=1   Y", Command("RCPT", "TO:<a@b>  X=1   Y")),
            (b"AUTH PLAIN dGVzdAB0ZXN0", Command("AUTH", "PLAIN dGVzdAB0ZXN0")),
            (b"", Command("", "")),
            (b" NOOP", Command("", "NOOP")),
            (b"DATA ", Command("DATA", "")),
        ],
    )
    def test_split(self, line: bytes, expected: Command) -> None:
        """The verb is upper-cased and the argument trimmed of outer spaces."""
        assert expected == parse_command(line)

    def test_argument_case_kept(self) -> None:
        """Only the verb is upper-cased; the argument keeps its case."""
        assert "Mixed.Case" == parse_command(b"helo Mixed.Case").argument

    def test_tab_is_not_a_separator(self) -> None:
        """Only SP separates the verb (RFC 5321 4.1.1), so a tab stays in the verb."""
        assert "NOOP\tX" == parse_command(b"NOOP\tx").verb

    def test_non_utf8(self) -> None:
        """Undecodable bytes survive in the argument as surrogates."""
        command = parse_command(b"HELO h\xffst")
        assert ("HELO", b"h\xffst") == (
            command.verb,
            command.argument.encode("utf-8", "surrogateescape"),
        )

    @pytest.mark.parametrize(
        "spelled",
        ["ma\u0131l", "\u017fTARTTLS", "rcpt\u200b", "h\u0130lo", "\uff2d\uff21IL"],
    )
    def test_non_ascii_verb_is_not_folded(self, spelled: str) -> None:
        """str.upper() turns some non-ASCII letters into ASCII ones (dotless
        i -> I, long s -> S): a verb with any non-ASCII letter stays as sent,
        so it names no command (a filter in front would not read it as one)."""
        line = (spelled + " FROM:<a@example.org>").encode("utf-8")
        assert (spelled, "FROM:<a@example.org>") == split_command(line)
        assert spelled == parse_command(line).verb

    @given(
        st.sampled_from(["DATA", "QUIT", "RSET", "NOOP", "HELP", "STARTTLS"]),
        st.lists(st.booleans(), min_size=8, max_size=8),
        st.sampled_from(["", " ", "  x", "\t", "X"]),
    )
    def test_bare_commands_as_split(
        self, verb: str, upper: list[bool], tail: str
    ) -> None:
        """The commands without an argument (looked up, not split) come out
        as splitting would make them, in any case and with anything after."""
        spelled = "".join(c if up else c.lower() for c, up in zip(verb, upper))
        line = (spelled + tail).encode("ascii")
        verb_part, _, argument = (spelled + tail).partition(" ")
        assert (verb_part.upper(), argument.strip(" ")) == parse_command(line)
        assert isinstance(parse_command(line), Command)

    @given(st.binary(max_size=40))
    def test_split_command_agrees(self, line: bytes) -> None:
        """split_command (the protocol's form) is parse_command as a tuple."""
        assert tuple(parse_command(line)) == split_command(line)

    @pytest.mark.parametrize("verb", ["MAIL", "Rcpt", "helo", "DATA", "noop"])
    @pytest.mark.parametrize("tail", ["", " ", " x ", "  TO:<a@b>  X=1", "\t"])
    def test_split_command_agrees_on_commands(self, verb: str, tail: str) -> None:
        """The same on lines shaped like commands (random bytes rarely are)."""
        line = (verb + tail).encode("ascii")
        assert tuple(parse_command(line)) == split_command(line)

    def test_command_is_frozen(self) -> None:
        """Commands are immutable values."""
        with pytest.raises(AttributeError):
            parse_command(b"NOOP").verb = "QUIT"  # type: ignore[misc]


class TestParseHelo:
    """The client's name from HELO/EHLO."""

    @given(st.text(alphabet="aZ09_-.[]:@ \u00fc", max_size=24))
    def test_ascii_fast_match_is_within_the_full_one(self, name: str) -> None:
        """The ASCII pattern tried first accepts only names the full one does."""
        from twisted_smtpd._commands import _ASCII_HELO_NAME, _HELO_NAME

        if _ASCII_HELO_NAME.match(name):
            assert _HELO_NAME.match(name)

    @pytest.mark.parametrize(
        "name", ["client.example", "a", "x-1.example.com", "D_4F2K", "c.example."]
    )
    def test_ascii_fast_match_takes_the_usual_names(self, name: str) -> None:
        """The usual names are taken by the fast pattern (else it saves nothing)."""
        from twisted_smtpd._commands import _ASCII_HELO_NAME

        assert _ASCII_HELO_NAME.match(name)

    @pytest.mark.parametrize(
        "argument, expected",
        [
            ("client.example", "client.example"),
            ("localhost", "localhost"),
            ("a", "a"),
            ("x-1.example.com", "x-1.example.com"),
            ("123.example", "123.example"),
            ("[192.0.2.1]", "[192.0.2.1]"),
            ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
            ("[IPv6:::ffff:192.0.2.1]", "[IPv6:::ffff:192.0.2.1]"),
            ("client.example some extra words", "client.example"),
            ("bücher.example", "bücher.example"),
            # Not RFC 5321 domains, but real clients send them.
            ("DESKTOP_4F2K", "DESKTOP_4F2K"),
            ("client_name.example", "client_name.example"),
            ("client.example.", "client.example."),
        ],
    )
    def test_accepted(self, argument: str, expected: str) -> None:
        """Domains and address literals are accepted; trailing text is ignored."""
        assert expected == parse_helo(argument)

    @pytest.mark.parametrize(
        "argument",
        [
            "",
            "-client.example",
            "client-.example",
            "client..example",
            ".client.example",
            "[192.0.2]",
            "[192.0.2.256]",
            "[client.example]",
            "192.0.2.1]",
            "a@b",
            "<client.example>",
            INVALID_UTF8,
        ],
    )
    def test_refused(self, argument: str) -> None:
        """Anything that is not a domain or address literal is 501 5.5.4."""
        with pytest.raises(SMTPError) as info:
            parse_helo(argument)
        assert R501_SYNTAX_HELO == info.value.reply

    def test_longest_domain(self) -> None:
        """A 255-character domain is accepted."""
        name = domain_of_length(255)
        assert name == parse_helo(name)

    def test_domain_too_long(self) -> None:
        """A 256-character domain is refused."""
        with pytest.raises(SMTPError) as info:
            parse_helo(domain_of_length(256))
        assert R501_SYNTAX_HELO == info.value.reply

    @given(domains)
    def test_any_domain(self, domain: str) -> None:
        """Every syntactically valid ASCII domain is accepted unchanged."""
        assert domain == parse_helo(domain)


class TestParseAddress:
    """The inside of a path."""

    def test_empty_allowed(self) -> None:
        """The null path is the empty string when allowed."""
        assert "" == parse_address("", allow_empty=True)

    def test_empty_refused(self) -> None:
        """The null path is an error where it is not allowed."""
        with pytest.raises(ValueError):
            parse_address("", allow_empty=False)

    def test_route_only(self) -> None:
        """A source route with no mailbox after it is an error."""
        with pytest.raises(ValueError):
            parse_address("@relay.example:", allow_empty=True)

    def test_route_dropped(self) -> None:
        """A source route is accepted and dropped (RFC 5321 4.1.2, C.)."""
        assert "u@c.example" == parse_address(
            "@a.example,@b.example:u@c.example", allow_empty=False
        )

    @given(mailboxes)
    def test_any_valid_mailbox(self, mailbox: str) -> None:
        """Every valid ASCII mailbox within the length limits comes back unchanged."""
        local = mailbox.rpartition("@")[0]
        if len(mailbox) <= MAX_PATH and len(local) <= MAX_LOCAL_PART:
            assert mailbox == parse_address(mailbox, allow_empty=False)


class TestMailPath:
    """The reverse-path of MAIL."""

    @pytest.mark.parametrize(
        "argument, sender",
        [
            ("FROM:<user@example.com>", "user@example.com"),
            ("from:<user@example.com>", "user@example.com"),
            ("From:<User.Name@Example.COM>", "User.Name@Example.COM"),
            ("FROM: <user@example.com>", "user@example.com"),
            ("FROM:   <user@example.com>", "user@example.com"),
            ("FROM:<>", ""),
            ("FROM: <>", ""),
            ("FROM:<first.last+tag@sub.example.com>", "first.last+tag@sub.example.com"),
            (
                "FROM:<!#$%&'*+/=?^_`{|}~-@example.com>",
                "!#$%&'*+/=?^_`{|}~-@example.com",
            ),
            ("FROM:<u@localhost>", "u@localhost"),
            ("FROM:<u@123.example>", "u@123.example"),
        ],
    )
    def test_accepted(self, argument: str, sender: str) -> None:
        """Valid reverse-paths, including the null path, are returned unbracketed."""
        assert (sender, {}) == parse_mail(argument)

    def test_without_brackets(self) -> None:
        """A bare address is accepted (lenient for simple scripts)."""
        assert ("user@example.com", {"SIZE": "10"}) == parse_mail(
            "FROM:user@example.com SIZE=10"
        )

    @pytest.mark.parametrize(
        "argument",
        [
            "",
            "FROM",
            "FROM<user@example.com>",
            "FROM :<user@example.com>",
            "TO:<user@example.com>",
            "FROM:",
            "FROM:   ",
            "FROM:<user@example.com",
            "FROM:<",
            "FROM:<user@example.com>SIZE=10",
            "FROM:<user@example.com>>",
            'FROM:<"unterminated@example.com>',
            "SENDER:<user@example.com>",
            "FROM:<<user@example.com>>",
            'FROM:<"a"b"@example.com>',
        ],
    )
    def test_syntax_error(self, argument: str) -> None:
        """A missing FROM:, bracket, separator or quote is 501 5.5.4 (MAIL syntax)."""
        assert R501_SYNTAX_MAIL == mail_error(argument)

    @pytest.mark.parametrize(
        "path",
        [
            "garbage",
            "user",
            "user@",
            "@example.com",
            "user@@example.com",
            "user@example@example.com",
            "user..name@example.com",
            ".user@example.com",
            "user.@example.com",
            "user name@example.com",
            "user@example..com",
            "user@.example.com",
            "user@example.com.",
            "user@-example.com",
            "user@example-.com",
            "user@exa_mple.com",
            "user@[192.0.2.256]",
            "user@[192.0.2]",
            "user@[192.0.2.1.5]",
            "user@[]",
            "user@[IPv6:]",
            "user@[example.com]",
            "user@[tag:]",
            '"unbalanced@example.com"',
            '"bad\\\x01escape"@example.com',
            "user@example.com,",
            "user\x00@example.com",
            "@relay.example:",
            "@relay.example,user@example.com",
        ],
    )
    def test_bad_sender(self, path: str) -> None:
        """Malformed mailboxes inside the brackets are 501 5.1.7."""
        assert R501_BAD_SENDER == mail_error(f"FROM:<{path}>")

    def test_bad_sender_enhanced_code(self) -> None:
        """The bad-sender reply uses 5.1.7 (bad sender's mailbox syntax, RFC 3463)."""
        reply = mail_error("FROM:<nonsense>")
        assert (501, "5.1.7") == (reply.code, reply.enhanced)

    @pytest.mark.parametrize(
        "local",
        [
            '"john doe"',
            '"john \\"the man\\" doe"',
            '"back\\\\slash"',
            '"a@b"',
            '"with>bracket"',
            '"<>"',
            '""',
            '"  "',
            '"\\ escaped space"',
            '"tab\\~tilde"',
        ],
    )
    def test_quoted_local_part(self, local: str) -> None:
        """Quoted local parts with spaces, escapes, @ and > are kept verbatim."""
        assert (f"{local}@example.com", {}) == parse_mail(f"FROM:<{local}@example.com>")

    def test_quoted_local_part_then_parameters(self) -> None:
        """A > inside quotes does not end the path; parameters after it still parse."""
        assert ('"a>b"@example.com', {"SIZE": "5"}) == parse_mail(
            'FROM:<"a>b"@example.com> SIZE=5'
        )

    @pytest.mark.parametrize(
        "domain",
        [
            "[192.0.2.1]",
            "[0.0.0.0]",
            "[255.255.255.255]",
            "[IPv6:2001:db8::1]",
            "[IPv6:::1]",
            "[IPv6:::ffff:192.0.2.1]",
            "[IPv6:2001:DB8:0:0:0:0:0:1]",
            "[x-tag:anything!here]",
            "[tag:value]",
        ],
    )
    def test_address_literal(self, domain: str) -> None:
        """IPv4, IPv6 and general address literals are accepted as domains."""
        assert (f"user@{domain}", {}) == parse_mail(f"FROM:<user@{domain}>")

    @pytest.mark.parametrize(
        "path, mailbox",
        [
            ("@relay.example:user@example.com", "user@example.com"),
            ("@a.example,@b.example,@c.example:user@example.com", "user@example.com"),
            ('@a.example:"john doe"@example.com', '"john doe"@example.com'),
        ],
    )
    def test_source_route_dropped(self, path: str, mailbox: str) -> None:
        """Source routes are accepted and dropped (RFC 5321 appendix C)."""
        assert (mailbox, {}) == parse_mail(f"FROM:<{path}>")

    def test_local_part_limit(self) -> None:
        """A 64-character local part is accepted."""
        local = "l" * MAX_LOCAL_PART
        assert f"{local}@example.com" == parse_mail(f"FROM:<{local}@example.com>")[0]

    def test_local_part_too_long(self) -> None:
        """A 65-character local part is 501 5.1.7."""
        local = "l" * (MAX_LOCAL_PART + 1)
        assert R501_BAD_SENDER == mail_error(f"FROM:<{local}@example.com>")

    def test_quoted_local_part_too_long(self) -> None:
        """The quotes count towards the local-part limit."""
        local = '"' + "q" * (MAX_LOCAL_PART - 1) + '"'
        assert R501_BAD_SENDER == mail_error(f"FROM:<{local}@example.com>")

    def test_path_limit(self) -> None:
        """A mailbox of MAX_PATH characters is accepted."""
        mailbox = "u@" + domain_of_length(MAX_PATH - 2)
        assert mailbox == parse_mail(f"FROM:<{mailbox}>")[0]

    def test_path_too_long(self) -> None:
        """A mailbox one character over MAX_PATH is 501 5.1.7."""
        mailbox = "u@" + domain_of_length(MAX_PATH - 1)
        assert R501_BAD_SENDER == mail_error(f"FROM:<{mailbox}>")

    def test_route_not_counted(self) -> None:
        """The length limit applies to the mailbox after the route is dropped."""
        mailbox = "u@" + domain_of_length(MAX_PATH - 2)
        route = "@" + domain_of_length(60) + ":"
        assert mailbox == parse_mail(f"FROM:<{route}{mailbox}>")[0]

    @given(mailboxes)
    def test_any_valid_mailbox(self, mailbox: str) -> None:
        """Every valid ASCII mailbox within the limits is returned unchanged."""
        local = mailbox.rpartition("@")[0]
        if len(mailbox) <= MAX_PATH and len(local) <= MAX_LOCAL_PART:
            assert (mailbox, {}) == parse_mail(f"FROM:<{mailbox}>")

    @given(st.text(alphabet="".join(chr(c) for c in range(0x20, 0x7F)), max_size=25))
    def test_quoted_round_trip(self, text: str) -> None:
        """Any printable-ASCII local part, properly quoted, is accepted verbatim."""
        local = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        assert (
            f"{local}@example.com" == parse_rcpt(f"TO:<{local}@example.com>", False)[0]
        )


class TestMailInternational:
    """Non-ASCII reverse-paths and SMTPUTF8 (RFC 6531)."""

    @pytest.mark.parametrize(
        "mailbox",
        [
            "jörg@example.com",
            "user@bücher.example",
            "用户@例子.广告",
            "δοκιμή@παράδειγμα.δοκιμή",
        ],
    )
    def test_needs_smtputf8(self, mailbox: str) -> None:
        """A non-ASCII sender without SMTPUTF8 is 553 5.6.7."""
        reply = mail_error(f"FROM:<{mailbox}>")
        assert R553_NEEDS_SMTPUTF8 == reply
        assert (553, "5.6.7") == (reply.code, reply.enhanced)

    @pytest.mark.parametrize(
        "mailbox",
        [
            "jörg@example.com",
            "user@bücher.example",
            "用户@例子.广告",
            '"ü ü"@example.com',
        ],
    )
    def test_with_smtputf8(self, mailbox: str) -> None:
        """A non-ASCII sender with SMTPUTF8 is accepted."""
        assert (mailbox, {"SMTPUTF8": None}) == parse_mail(f"FROM:<{mailbox}> SMTPUTF8")

    def test_ascii_with_smtputf8(self) -> None:
        """SMTPUTF8 is also fine with an ASCII sender."""
        assert ("a@b.example", {"SMTPUTF8": None}) == parse_mail(
            "FROM:<a@b.example> SMTPUTF8"
        )

    def test_null_path_with_smtputf8(self) -> None:
        """The null path may carry SMTPUTF8."""
        assert ("", {"SMTPUTF8": None}) == parse_mail("FROM:<> SMTPUTF8")

    @pytest.mark.parametrize(
        "raw",
        [
            b"\xff@example.com",
            b"user@exa\xffmple.com",
            b'"\xc3"@example.com',
            b"\xed\xa0\x80@x.example",
        ],
    )
    def test_invalid_utf8_refused(self, raw: bytes) -> None:
        """Bytes that are not UTF-8 never make a valid address, even with SMTPUTF8."""
        path = raw.decode("utf-8", "surrogateescape")
        assert R501_BAD_SENDER == mail_error(f"FROM:<{path}> SMTPUTF8")


class TestMailParameters:
    """ESMTP parameters of MAIL."""

    def test_known_parameters(self) -> None:
        """MAIL offers SIZE, BODY, SMTPUTF8, AUTH and the DSN parameters."""
        expected = {"SIZE", "BODY", "SMTPUTF8", "AUTH", "RET", "ENVID"}
        assert expected == set(MAIL_PARAMETERS)

    def test_all_together(self) -> None:
        """Several parameters are returned by upper-case keyword."""
        sender, params = parse_mail(
            "FROM:<a@b.example> size=1000 body=8bitmime smtputf8 Auth=<>"
        )
        assert {
            "SIZE": "1000",
            "BODY": "8BITMIME",
            "SMTPUTF8": None,
            "AUTH": "<>",
        } == params

    def test_extra_spaces(self) -> None:
        """Several spaces between parameters are tolerated."""
        assert {"SIZE": "1", "BODY": "7BIT"} == parse_mail(
            "FROM:<a@b.example>   SIZE=1    BODY=7BIT  "
        )[1]

    @pytest.mark.parametrize("value", ["0", "1", "33554432", "9" * 20])
    def test_size(self, value: str) -> None:
        """Decimal SIZE values of up to 20 digits are kept as text."""
        assert {"SIZE": value} == parse_mail(f"FROM:<a@b.example> SIZE={value}")[1]

    @pytest.mark.parametrize(
        "param",
        [
            "SIZE",
            "SIZE=",
            "SIZE=abc",
            "SIZE=-1",
            "SIZE=1.5",
            "SIZE=1e3",
            "SIZE=0x10",
            "SIZE=" + "9" * 21,
        ],
    )
    def test_size_bad(self, param: str) -> None:
        """A missing, non-numeric or absurdly long SIZE is 501 5.5.4."""
        assert bad_parameter("SIZE") == mail_error(f"FROM:<a@b.example> {param}")

    @pytest.mark.parametrize(
        "value, kept",
        [
            ("7BIT", "7BIT"),
            ("8BITMIME", "8BITMIME"),
            ("8bitmime", "8BITMIME"),
            ("7bit", "7BIT"),
        ],
    )
    def test_body(self, value: str, kept: str) -> None:
        """BODY=7BIT and BODY=8BITMIME are accepted in any case and upper-cased."""
        assert {"BODY": kept} == parse_mail(f"FROM:<a@b.example> BODY={value}")[1]

    @pytest.mark.parametrize(
        "param", ["BODY", "BODY=", "BODY=BINARYMIME", "BODY=8BIT", "BODY=x"]
    )
    def test_body_bad(self, param: str) -> None:
        """Other BODY values (including BINARYMIME, not offered) are 501 5.5.4."""
        assert bad_parameter("BODY") == mail_error(f"FROM:<a@b.example> {param}")

    @pytest.mark.parametrize("param", ["SMTPUTF8=yes", "SMTPUTF8=", "smtputf8=1"])
    def test_smtputf8_with_value(self, param: str) -> None:
        """SMTPUTF8 takes no value (RFC 6531 3.4)."""
        assert bad_parameter("SMTPUTF8") == mail_error(f"FROM:<a@b.example> {param}")

    @pytest.mark.parametrize("value", ["<>", "user+40example.com", "someone"])
    def test_auth(self, value: str) -> None:
        """AUTH=<mailbox> (RFC 4954 5) is accepted as xtext."""
        assert {"AUTH": value} == parse_mail(f"FROM:<a@b.example> AUTH={value}")[1]

    def test_auth_without_value(self) -> None:
        """AUTH needs a value."""
        assert bad_parameter("AUTH") == mail_error("FROM:<a@b.example> AUTH")

    @pytest.mark.parametrize(
        "param, name",
        [
            ("XFOO=1", "XFOO"),
            ("xfoo", "XFOO"),
            ("NOTIFY=NEVER", "NOTIFY"),
            ("MT-PRIORITY=1", "MT-PRIORITY"),
        ],
    )
    def test_unknown(self, param: str, name: str) -> None:
        """A parameter the server does not offer is 555 5.5.4 naming it."""
        assert unknown_parameter(name) == mail_error(f"FROM:<a@b.example> {param}")

    def test_unknown_name_truncated(self) -> None:
        """A long unknown keyword is truncated in the reply."""
        reply = mail_error("FROM:<a@b.example> " + "X" * 200)
        assert unknown_parameter("X" * 32) == reply

    def test_unknown_on_null_path(self) -> None:
        """Parameters are checked on the null path too."""
        assert unknown_parameter("XFOO") == mail_error("FROM:<> XFOO")

    @pytest.mark.parametrize(
        "param, name",
        [
            ("-SIZE=1", "-SIZE"),
            ("=1", "?"),
            ("SI_ZE=1", "SI_ZE"),
            ("SIZE=1=2", "SIZE"),
            ("AUTH=a\x01b", "AUTH"),
        ],
    )
    def test_malformed(self, param: str, name: str) -> None:
        """A malformed keyword or a value that is not xtext is 501 5.5.4."""
        assert bad_parameter(name) == mail_error(f"FROM:<a@b.example> {param}")

    def test_parameters_checked_before_address(self) -> None:
        """Parameter errors are found even when the address is also bad."""
        assert unknown_parameter("XFOO") == mail_error("FROM:<nonsense> XFOO")


class TestParseParameters:
    """The ESMTP parameter list on its own."""

    @pytest.mark.parametrize(
        "text, expected",
        [
            ("", {}),
            ("   ", {}),
            ("A", {"A": None}),
            ("a=Value", {"A": "Value"}),
            ("A B=c D", {"A": None, "B": "c", "D": None}),
            ("X-Y=1", {"X-Y": "1"}),
            ("K=!~", {"K": "!~"}),
        ],
    )
    def test_parse(self, text: str, expected: dict) -> None:
        """Keywords are upper-cased; values keep their case; valueless is None."""
        assert expected == parse_parameters(text)

    def test_last_wins(self) -> None:
        """A repeated keyword keeps the last value."""
        assert {"SIZE": "2"} == parse_parameters("SIZE=1 size=2")

    @given(
        st.dictionaries(
            st.from_regex(r"[A-Z0-9][A-Z0-9\-]{0,10}", fullmatch=True),
            st.one_of(
                st.none(), st.from_regex(r"[\x21-\x3c\x3e-\x7e]{1,10}", fullmatch=True)
            ),
            max_size=6,
        )
    )
    def test_round_trip(self, params: dict) -> None:
        """Any valid parameter list parses back to its keywords and values."""
        text = " ".join(k if v is None else f"{k}={v}" for k, v in params.items())
        assert params == parse_parameters(text)


class TestRcpt:
    """The forward-path of RCPT."""

    @pytest.mark.parametrize(
        "argument, recipient",
        [
            ("TO:<user@example.com>", "user@example.com"),
            ("to:<user@example.com>", "user@example.com"),
            ("TO: <user@example.com>", "user@example.com"),
            ("TO:user@example.com", "user@example.com"),
            ('TO:<"john doe"@example.com>', '"john doe"@example.com'),
            ("TO:<user@[192.0.2.1]>", "user@[192.0.2.1]"),
            ("TO:<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]"),
            ("TO:<@relay.example:user@example.com>", "user@example.com"),
            ("TO:<postmaster@example.com>", "postmaster@example.com"),
        ],
    )
    def test_accepted(self, argument: str, recipient: str) -> None:
        """Valid forward-paths are returned unbracketed, with no parameters."""
        assert (recipient, {}) == parse_rcpt(argument, False)

    @pytest.mark.parametrize("name", ["postmaster", "Postmaster", "POSTMASTER"])
    def test_postmaster_without_domain(self, name: str) -> None:
        """<postmaster> without a domain is accepted in any case (RFC 5321 4.1.1.3)."""
        assert (name, {}) == parse_rcpt(f"TO:<{name}>", False)

    def test_null_path_refused(self) -> None:
        """The null path is only for MAIL: RCPT TO:<> is 501 5.1.3."""
        reply = rcpt_error("TO:<>")
        assert R501_BAD_RECIPIENT == reply
        assert (501, "5.1.3") == (reply.code, reply.enhanced)

    @pytest.mark.parametrize(
        "path",
        [
            "garbage",
            "user",
            "user@",
            "@example.com",
            "user..x@example.com",
            "user@example..com",
            "postmaster@",
            "postmaster x",
        ],
    )
    def test_bad_recipient(self, path: str) -> None:
        """Malformed mailboxes are 501 5.1.3."""
        assert R501_BAD_RECIPIENT == rcpt_error(f"TO:<{path}>")

    def test_user_without_domain(self) -> None:
        """Only postmaster may come without a domain."""
        assert R501_BAD_RECIPIENT == rcpt_error("TO:<abuse>")

    @pytest.mark.parametrize(
        "argument",
        [
            "",
            "TO",
            "TO<user@example.com>",
            "FROM:<user@example.com>",
            "TO:",
            "TO:<user@example.com",
            "TO:<a@b.example>X=1",
        ],
    )
    def test_syntax_error(self, argument: str) -> None:
        """A missing TO:, bracket or separator is 501 5.5.4 with the RCPT syntax."""
        assert R501_SYNTAX_RCPT == rcpt_error(argument)

    @pytest.mark.parametrize(
        "param, name",
        [
            ("RET=FULL", "RET"),
            ("SIZE=1", "SIZE"),
            ("smtputf8", "SMTPUTF8"),
        ],
    )
    def test_parameters_unknown(self, param: str, name: str) -> None:
        """RCPT offers only the DSN parameters: any other is 555 5.5.4."""
        assert unknown_parameter(name) == rcpt_error(f"TO:<a@b.example> {param}")

    def test_parameters_on_postmaster(self) -> None:
        """Parameters are refused on <postmaster> too."""
        assert unknown_parameter("X") == rcpt_error("TO:<postmaster> X")

    def test_non_ascii_without_smtputf8(self) -> None:
        """A non-ASCII recipient outside an SMTPUTF8 transaction is 553 5.6.7."""
        assert R553_NEEDS_SMTPUTF8 == rcpt_error(
            "TO:<jörg@bücher.example>", smtputf8=False
        )

    def test_non_ascii_with_smtputf8(self) -> None:
        """A non-ASCII recipient in an SMTPUTF8 transaction is accepted."""
        assert ("jörg@bücher.example", {}) == parse_rcpt(
            "TO:<jörg@bücher.example>", True
        )

    def test_invalid_utf8_refused(self) -> None:
        """Undecodable bytes are a bad address even in an SMTPUTF8 transaction."""
        path = b"j\xf6rg@example.com".decode("utf-8", "surrogateescape")
        assert R501_BAD_RECIPIENT == rcpt_error(f"TO:<{path}>", smtputf8=True)

    def test_local_part_too_long(self) -> None:
        """A local part over 64 characters is 501 5.1.3."""
        assert R501_BAD_RECIPIENT == rcpt_error(f"TO:<{'r' * 65}@example.com>")

    def test_path_too_long(self) -> None:
        """A mailbox over MAX_PATH characters is 501 5.1.3."""
        mailbox = "u@" + domain_of_length(MAX_PATH - 1)
        assert R501_BAD_RECIPIENT == rcpt_error(f"TO:<{mailbox}>")

    @given(dot_strings, domains)
    def test_any_dot_string(self, local: str, domain: str) -> None:
        """Every dot-string local part at any domain is accepted unchanged."""
        mailbox = f"{local}@{domain}"
        assert (mailbox, {}) == parse_rcpt(f"TO:<{mailbox}>", False)

    @given(quoted_local_parts)
    def test_any_quoted(self, local: str) -> None:
        """Every quoted local part within the length limit is accepted unchanged."""
        mailbox = f"{local}@example.com"
        if len(local) <= MAX_LOCAL_PART:
            assert (mailbox, {}) == parse_rcpt(f"TO:<{mailbox}>", False)


class TestDSNParameters:
    """RFC 3461 parameters are accepted, checked and passed on."""

    @pytest.mark.parametrize(
        "param, key, value",
        [
            ("RET=full", "RET", "FULL"),
            ("RET=HDRS", "RET", "HDRS"),
            ("ENVID=QQ314159", "ENVID", "QQ314159"),
        ],
    )
    def test_mail(self, param: str, key: str, value: str) -> None:
        """RET and ENVID on MAIL are normalised and kept."""
        assert {key: value} == parse_mail(f"FROM:<a@b.example> {param}")[1]

    @pytest.mark.parametrize(
        "param, key, value",
        [
            ("NOTIFY=NEVER", "NOTIFY", "NEVER"),
            ("NOTIFY=success,delay", "NOTIFY", "SUCCESS,DELAY"),
            ("ORCPT=rfc822;a+40b.example", "ORCPT", "rfc822;a+40b.example"),
        ],
    )
    def test_rcpt(self, param: str, key: str, value: str) -> None:
        """NOTIFY and ORCPT on RCPT are normalised and kept."""
        assert {key: value} == parse_rcpt(f"TO:<a@b.example> {param}", False)[1]

    @pytest.mark.parametrize(
        "argument, name",
        [
            ("FROM:<a@b.example> RET=ALL", "RET"),
            ("FROM:<a@b.example> RET", "RET"),
            ("FROM:<a@b.example> ENVID=" + "x" * 101, "ENVID"),
        ],
    )
    def test_mail_bad_values(self, argument: str, name: str) -> None:
        """Bad RET/ENVID values are 501 5.5.4 naming the parameter."""
        assert bad_parameter(name) == mail_error(argument)

    @pytest.mark.parametrize(
        "param, name",
        [
            ("NOTIFY=NEVER,SUCCESS", "NOTIFY"),
            ("NOTIFY=SUCCESS,SUCCESS", "NOTIFY"),
            ("NOTIFY=SOMETIMES", "NOTIFY"),
            ("NOTIFY", "NOTIFY"),
            ("ORCPT=a@b.example", "ORCPT"),
            ("ORCPT=rfc822;", "ORCPT"),
        ],
    )
    def test_rcpt_bad_values(self, param: str, name: str) -> None:
        """Bad NOTIFY/ORCPT values are 501 5.5.4 naming the parameter."""
        assert bad_parameter(name) == rcpt_error(f"TO:<a@b.example> {param}")


# -- the fast path for common MAIL/RCPT shapes agrees with the full parser ------
def _outcome(parse: Any, *args: Any) -> Any:
    """What a parser gives: its result, or the reply it refuses with."""
    try:
        return ("ok", parse(*args))
    except SMTPError as error:
        return ("refused", error.reply)


_EDGE_PATHS = [
    "<>",
    "<a@b>",
    "<a@example.org>",
    "<A.B-c+d@Example.ORG>",
    "<a..b@c>",
    "<.a@b>",
    "<a.@b>",
    "<a@b.>",
    "<a@-b>",
    "<a@b->",
    "<a@b_c>",
    "<a@[127.0.0.1]>",
    "<a@[IPv6:::1]>",
    '<"a b"@c>',
    '<"a\\"b"@c>',
    "<@r.example:a@b>",
    "<@r1,@r2:a@b>",
    "<postmaster>",
    "<Postmaster>",
    "<a@b",
    "a@b>",
    "a@b",
    "<a@b>>",
    "<<a@b>>",
    "<a@@b>",
    "<a b@c>",
    "<é@b>",
    "<a@é.org>",
    "<a@b\udcff>",
    "<" + "l" * 64 + "@b>",
    "<" + "l" * 65 + "@b>",
    "<a@" + ".".join(["d" * 63] * 4) + ">",
    "<a@" + ".".join(["d" * 63] * 4) + "x>",
    "<" + "l" * 64 + "@" + ".".join(["d" * 63] * 3) + ".dd>",
    "<" + "l" * 64 + "@" + ".".join(["d" * 63] * 3) + ".ddd>",
]
_EDGE_PARAMS = [
    "",
    " ",
    "  ",
    " SIZE=1000",
    " size=1000",
    " SIZE=1000 BODY=8BITMIME",
    " SIZE=99999999999999999999999",
    " SIZE=x",
    " BODY=8bitmime",
    " BODY=BINARY",
    " SMTPUTF8",
    " SMTPUTF8=1",
    " RET=HDRS ENVID=abc",
    " NOTIFY=SUCCESS,FAILURE",
    " NOTIFY=NEVER,SUCCESS",
    " ORCPT=rfc822;a@b",
    " ORCPT=rfc822",
    " AUTH=<>",
    " XFOO=1",
    " =1",
    " SIZE=1\tBODY=7BIT",
    " SIZE=1\nBODY=7BIT",
    "\tSIZE=1",
    ' X="y>"',
    ' ENVID="q\\\\"',
    " SIZE=é",
]
_EDGE_PREFIXES = {
    "MAIL": ["FROM:", "from:", "FrOm:", "FROM: ", "FROM :", "FROM", "FRO:", ""],
    "RCPT": ["TO:", "to:", "tO:", "TO: ", "TO :", "TO", ""],
}


def _agree(verb: str, argument: str) -> None:
    """The public parser (with its fast path) and the full parser agree."""
    from twisted_smtpd._commands import _parse_mail_full, _parse_rcpt_full

    for dsn in (True, False):
        if verb == "MAIL":
            assert _outcome(parse_mail, argument, dsn) == _outcome(
                _parse_mail_full, argument, dsn
            ), (argument, dsn)
            continue
        for smtputf8 in (True, False):
            assert _outcome(parse_rcpt, argument, smtputf8, dsn) == _outcome(
                _parse_rcpt_full, argument, smtputf8, dsn
            ), (argument, smtputf8, dsn)


class TestFastPathAgrees:
    """C{parse_mail}/C{parse_rcpt} take a one-match path for the common shapes;
    every reply, value and parameter must be what the full parser gives."""

    @pytest.mark.parametrize("verb", ["MAIL", "RCPT"])
    def test_edge_table(self, verb: str) -> None:
        for prefix in _EDGE_PREFIXES[verb]:
            for path in _EDGE_PATHS:
                for params in _EDGE_PARAMS:
                    _agree(verb, prefix + path + params)

    def test_fast_path_taken(self) -> None:
        """The common shapes really take it (else this proves nothing)."""
        from twisted_smtpd._commands import _SIMPLE_MAIL, _SIMPLE_RCPT

        assert _SIMPLE_MAIL.match("FROM:<a@example.org>")
        assert _SIMPLE_MAIL.match("FROM:<> SIZE=10")
        assert _SIMPLE_RCPT.match("TO:<b@example.org> NOTIFY=NEVER")
        assert parse_mail("from:<a.b@c.d> SIZE=10") == ("a.b@c.d", {"SIZE": "10"})
        assert parse_rcpt("To:<b@c>", False) == ("b@c", {})

    def test_fresh_parameters_each_time(self) -> None:
        """Envelopes keep the dict: a shared one would leak between them."""
        first = parse_mail("FROM:<a@b>")[1]
        first["X"] = "1"
        assert parse_mail("FROM:<a@b>")[1] == {}

    @given(
        st.sampled_from(["MAIL", "RCPT"]),
        st.sampled_from(
            ["FROM:", "TO:", "from:", "to:", "FROM: ", "TO:  ", "FROM", ""]
        ),
        st.one_of(
            mailboxes.map(lambda m: f"<{m}>"),
            st.sampled_from(_EDGE_PATHS),
            st.text(max_size=30).map(lambda t: f"<{t}>"),
            st.text(max_size=30),
            # The characters where dot-strings and labels split.
            st.text(alphabet='aZ9-.@+"\\ _', max_size=20).map(lambda t: f"<{t}>"),
        ),
        st.lists(
            st.one_of(
                st.sampled_from(
                    ["SIZE=10", "BODY=8BITMIME", "SMTPUTF8", "NOTIFY=NEVER", "X"]
                ),
                st.text(max_size=12),
            ),
            max_size=3,
        ),
        st.sampled_from([" ", "  ", "\t", ""]),
    )
    def test_any_argument(
        self, verb: str, prefix: str, path: str, params: list[str], sep: str
    ) -> None:
        argument = prefix + path + "".join(sep + p for p in params)
        _agree(verb, argument)

    @given(dot_strings, domains, st.sampled_from(["", " SIZE=1", " NOTIFY=NEVER"]))
    def test_any_simple_mailbox(self, local: str, domain: str, params: str) -> None:
        _agree("MAIL", f"FROM:<{local}@{domain}>{params}")
        _agree("RCPT", f"TO:<{local}@{domain}>{params}")
