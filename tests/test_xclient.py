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


# -- the protocol, in memory -------------------------------------------------

from twisted.internet.address import IPv4Address, IPv6Address  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from twisted_smtpd import SMTPFactory  # noqa: E402
from twisted_smtpd.handlers import MemoryHandler  # noqa: E402
from twisted_smtpd.testing import connect  # noqa: E402

PROXY = IPv4Address("TCP", "10.0.0.5", 50000)
KEYWORD = b"250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT"


class Checked(MemoryHandler):
    """Records the peers check_client saw; refuses 203.0.113.66."""

    def __init__(self) -> None:
        super().__init__()
        self.clients: list[object] = []

    def check_client(self, peer):
        self.clients.append(peer)
        if peer.host == "203.0.113.66":
            raise SMTPError(554, "5.7.1", "Not you")


def proxied(handler=None, peer=PROXY, **kwargs):
    handler = handler if handler is not None else MemoryHandler()
    kwargs.setdefault("xclient_hosts", ["10.0.0.0/24"])
    factory = SMTPFactory(handler, hostname="mx.test", reactor=Clock(), **kwargs)
    client = connect(factory, peer=peer)
    client.replies()
    return factory, handler, client


def send_message(client) -> list[bytes]:
    client.command(b"MAIL FROM:<a@b.example>")
    client.command(b"RCPT TO:<c@d.example>")
    client.command(b"DATA")
    return client.command(b"Subject: hi\r\n\r\nbody\r\n.")


class TestProtocol:
    def test_advertised_only_to_allowed_clients(self) -> None:
        _, _, client = proxied()
        assert KEYWORD in client.command(b"EHLO proxy.example")
        _, _, stranger = proxied(peer=IPv4Address("TCP", "192.0.2.9", 1))
        assert not any(b"XCLIENT" in line for line in stranger.command(b"EHLO x"))

    def test_unauthorized_550(self) -> None:
        _, handler, client = proxied(peer=IPv4Address("TCP", "192.0.2.9", 1))
        client.command(b"EHLO x.example")
        assert [b"550 5.7.0 XCLIENT: insufficient authorization"] == client.command(
            b"XCLIENT ADDR=198.51.100.7"
        )
        send_message(client)
        assert "192.0.2.9" == handler.messages[0].peer.host

    def test_forwarded_client_everywhere(self) -> None:
        handler = Checked()
        factory, _, client = proxied(handler)
        client.command(b"EHLO proxy.example")
        assert [b"220 mx.test ESMTP twisted_smtpd ready"] == client.command(
            b"XCLIENT NAME=spike.example.org ADDR=198.51.100.7 PORT=4711"
        )
        assert [PROXY, IPv4Address("TCP", "198.51.100.7", 4711)] == handler.clients
        # A fresh session: greet again; XCLIENT is no longer offered.
        assert [b"503 Send HELO/EHLO first"] == client.command(
            b"MAIL FROM:<a@b.example>"
        )
        assert KEYWORD not in client.command(b"EHLO spike.example.org")
        assert send_message(client)[-1].startswith(b"250 2.0.0 OK: queued as ")
        envelope = handler.messages[0]
        assert ("198.51.100.7", 4711) == (envelope.peer.host, envelope.peer.port)
        assert "spike.example.org" == envelope.peer_name
        assert envelope.received_header.startswith(
            b"Received: from spike.example.org (spike.example.org [198.51.100.7])"
        )
        # The per-address count moved to the forwarded client.
        assert {"198.51.100.7": 1} == dict(factory._per_ip)
        # Postfix: once ADDR is outside the list, no more XCLIENT.
        assert [b"550 5.7.0 XCLIENT: insufficient authorization"] == client.command(
            b"XCLIENT ADDR=198.51.100.8"
        )

    def test_helo_proto_login_kept(self) -> None:
        _, handler, client = proxied()
        client.command(b"EHLO proxy.example")
        client.command(b"XCLIENT HELO=client.example PROTO=ESMTP LOGIN=wietse")
        client.command(b"XCLIENT ADDR=IPV6:2001:db8::7")
        # Each XCLIENT resets what it does not name: the second forgot HELO.
        assert [b"503 Send HELO/EHLO first"] == client.command(b"MAIL FROM:<>")
        client.command(b"EHLO c.example")
        send_message(client)
        assert IPv6Address("TCP", "2001:db8::7", 50000) == handler.messages[0].peer
        assert None is handler.messages[0].auth

        _, handler, client = proxied()
        client.command(b"XCLIENT ADDR=198.51.100.7 HELO=c.example PROTO=ESMTP LOGIN=w")
        assert send_message(client)[-1].startswith(b"250 2.0.0 OK: queued as ")
        envelope = handler.messages[0]
        assert ("c.example", True, "w") == (
            envelope.helo,
            envelope.esmtp,
            envelope.auth,
        )
        assert b"with ESMTPA" in envelope.received_header

    def test_in_transaction_503(self) -> None:
        _, _, client = proxied()
        client.command(b"EHLO proxy.example")
        client.command(b"MAIL FROM:<a@b.example>")
        assert [
            b"503 5.5.1 XCLIENT not allowed during a mail transaction"
        ] == client.command(b"XCLIENT ADDR=198.51.100.7")

    @pytest.mark.parametrize(
        "line, reply",
        [
            (b"XCLIENT", b"501 5.5.4 Syntax: XCLIENT attribute=value..."),
            (b"XCLIENT ADDR=1.2.3", b"501 5.5.4 Bad ADDR syntax: 1.2.3"),
            (b"XCLIENT COLOR=red", b"501 5.5.4 Bad XCLIENT attribute name: COLOR"),
        ],
    )
    def test_bad_syntax_501(self, line: bytes, reply: bytes) -> None:
        _, _, client = proxied()
        client.command(b"EHLO proxy.example")
        assert [reply] == client.command(line)
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")  # session unchanged

    def test_check_client_refuses_forwarded_client(self) -> None:
        _, _, client = proxied(Checked())
        assert [b"554 Not you"] == client.command(b"XCLIENT ADDR=203.0.113.66")
        assert client.closed

    def test_per_address_limit_applies_to_forwarded_client(self) -> None:
        from twisted_smtpd._session import Limits

        factory, _, first = proxied(limits=Limits(max_connections_per_ip=1))
        first.command(b"XCLIENT ADDR=198.51.100.7")
        second = connect(factory, peer=PROXY)
        second.replies()
        assert [b"421 mx.test Too many connections, try again later"] == second.command(
            b"XCLIENT ADDR=198.51.100.7"
        )
        assert second.closed

    def test_unavailable_name(self) -> None:
        _, handler, client = proxied()
        client.command(b"XCLIENT ADDR=198.51.100.7 NAME=[UNAVAILABLE]")
        client.command(b"EHLO c.example")
        send_message(client)
        assert "unknown" == handler.messages[0].peer_name
        assert b"(unknown [198.51.100.7])" in handler.messages[0].received_header


# -- real senders: swaks --xclient, and nginx's mail proxy with `xclient on;` -

import subprocess  # noqa: E402

import pytest_twisted  # noqa: E402
from twisted.internet import threads  # noqa: E402

from .helpers import require_program  # noqa: E402


@pytest_twisted.inlineCallbacks
def test_swaks_xclient(listen):
    """swaks --xclient: the message is from the client swaks named."""
    require_program("swaks")
    memory = MemoryHandler()
    port = listen(memory, xclient_hosts=["127.0.0.0/8"])

    def client():
        return subprocess.run(
            ["swaks", "--server", "127.0.0.1", "--port", str(port)]
            + [
                "--ehlo",
                "proxy.example",
                "--from",
                "a@b.example",
                "--to",
                "c@d.example",
            ]
            + ["--xclient", "NAME=spike.example.org ADDR=198.51.100.7 PORT=4711"]
            + ["--body", "via swaks", "--timeout", "20"],
            capture_output=True,
            timeout=60,
        )

    result = yield threads.deferToThread(client)
    assert 0 == result.returncode, result.stdout + result.stderr
    assert b"XCLIENT NAME ADDR PORT" in result.stdout  # it was advertised
    envelope = memory.messages[0]
    assert ("198.51.100.7", 4711) == (envelope.peer.host, envelope.peer.port)
    assert b"(spike.example.org [198.51.100.7])" in envelope.received_header


@pytest_twisted.inlineCallbacks
def test_refused_over_a_socket(listen):
    """A client outside the allowed networks: not advertised, and 550 5.7.0."""
    import smtplib

    memory = MemoryHandler()
    port = listen(memory, xclient_hosts=["10.0.0.0/8"])

    def client():
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
            smtp.ehlo("c.example")
            return smtp.has_extn("xclient"), smtp.docmd("XCLIENT", "ADDR=192.0.2.7")

    advertised, reply = yield threads.deferToThread(client)
    assert not advertised
    assert (550, b"5.7.0 XCLIENT: insufficient authorization") == reply


@pytest.fixture
def nginx_proxy():
    """C{start(backend_port)}: an nginx mail proxy with xclient on."""
    require_program("nginx")
    from .nginxproxy import MAIL_MODULE, NginxMailProxy

    if not MAIL_MODULE.exists():
        require_program("libnginx-mod-mail is missing: no ngx_mail_module.so")
    proxies = []

    def start(backend_port: int) -> NginxMailProxy:
        proxies.append(NginxMailProxy(backend_port))
        return proxies[-1]

    yield start
    for proxy in proxies:
        proxy.stop()


@pytest_twisted.inlineCallbacks
def test_nginx_mail_proxy(listen, nginx_proxy):
    """nginx (xclient on) in front: the envelope has the client nginx served.

    The client connects to nginx from 127.0.0.2; nginx connects to us from
    127.0.0.1, the only address allowed XCLIENT, and forwards the client's
    address, its EHLO and the envelope.
    """
    require_program("swaks")
    memory = MemoryHandler()
    port = listen(memory, xclient_hosts=["127.0.0.1/32"])
    proxy = nginx_proxy(port)

    def client():
        return subprocess.run(
            ["swaks", "--server", "127.0.0.1", "--port", str(proxy.port)]
            + ["--local-interface", "127.0.0.2", "--ehlo", "client.example"]
            + ["--from", "a@b.example", "--to", "c@d.example"]
            + ["--body", "via nginx", "--timeout", "20"],
            capture_output=True,
            timeout=60,
        )

    result = yield threads.deferToThread(client)
    assert 0 == result.returncode, result.stdout + result.stderr + proxy.log().encode()
    envelope = memory.messages[0]
    assert b"via nginx" in envelope.content
    assert "127.0.0.2" == envelope.peer.host
    assert "client.example" == envelope.helo
    assert "unknown" == envelope.peer_name  # nginx sent NAME=[UNAVAILABLE]
    assert b"from client.example (unknown [127.0.0.2])" in envelope.received_header
    assert "127.0.0.2" == proxy.auth_requests[0]["Client-IP"]


# -- the command line ----------------------------------------------------------


def test_options_build_the_factory(tmp_path, monkeypatch) -> None:
    from twisted_smtpd.rdns import ReverseDNS
    from twisted_smtpd.tap import build_factory

    from .test_tap import DISCARD, parse

    monkeypatch.chdir(tmp_path)
    factory = build_factory(
        parse(
            *DISCARD,
            "--xclient-hosts",
            "127.0.0.1/32",
            "--xclient-hosts",
            "10.0.0.0/8,2001:db8::/32",
            "--auth-failure-limit",
            "3/60",
            "--dns-timeout",
            "2.5",
        )
    )
    assert "10.1.2.3" in factory.xclient_hosts
    assert "2001:db8::1" in factory.xclient_hosts
    assert "192.0.2.1" not in factory.xclient_hosts
    assert (3, 60) == (factory.auth_limiter.limit, factory.auth_limiter.window)
    assert isinstance(factory.reverse_dns, ReverseDNS)
    assert 2.5 == factory.reverse_dns.timeout
    defaults = build_factory(parse(*DISCARD, "--no-reverse-dns"))
    assert None is defaults.reverse_dns
    assert (10, 600) == (defaults.auth_limiter.limit, defaults.auth_limiter.window)
    assert not defaults.xclient_hosts
    assert (
        None is build_factory(parse(*DISCARD, "--auth-failure-limit", "0")).auth_limiter
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("--xclient-hosts", "10.0.0.1/8"),
            "--xclient-hosts: bad network '10.0.0.1/8'",
        ),
        (("--auth-failure-limit", "ten"), "--auth-failure-limit: expected N/SECONDS"),
        (("--dns-timeout", "0"), "--dns-timeout: expected seconds > 0, not '0'"),
    ],
)
def test_bad_options_one_line(capsys, tmp_path, monkeypatch, args, message) -> None:
    from .test_tap import DISCARD, parse_error

    monkeypatch.chdir(tmp_path)
    error = parse_error(capsys, *DISCARD, *args)
    assert error.startswith(f"twistd smtpd: error: {message}"), error
    assert 1 == len(error.strip().splitlines())
