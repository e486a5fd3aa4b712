"""The LineReceiver contract a subclass of SMTPServerProtocol inherits."""

from __future__ import annotations

from twisted.internet.task import Clock

from twisted_smtpd import SMTPFactory
from twisted_smtpd.handlers import MemoryHandler
from twisted_smtpd.protocol import SMTPServerProtocol
from twisted_smtpd.replies import R250_OK, Reply
from twisted_smtpd.testing import FakeClient, connect


def client_for(protocol_class: type, **factory_kwargs) -> FakeClient:
    factory = SMTPFactory(
        MemoryHandler(), hostname="mx.test", reactor=Clock(), **factory_kwargs
    )
    factory.protocol = protocol_class
    client = connect(factory)
    client.replies()
    return client


class TestVerbs:
    def test_override_a_verb(self) -> None:
        """A do_NOOP in a subclass replaces the built-in one."""

        class Quiet(SMTPServerProtocol):
            def do_NOOP(self, argument: str) -> None:
                self.reply(Reply(250, "2.0.0", f"noop {argument or 'nothing'}"))

        client = client_for(Quiet)
        assert [b"250 noop x"] == client.command(b"NOOP x")

    def test_add_a_verb(self) -> None:
        """A new do_X in a subclass is a verb; the base class does not learn it."""

        class Hello(SMTPServerProtocol):
            def do_XHELLO(self, argument: str) -> None:
                self.reply(Reply(250, "2.0.0", f"hello {argument}"))

        client = client_for(Hello)
        client.command(b"EHLO c.example")
        assert [b"250 2.0.0 hello world"] == client.command(b"XHELLO world")
        plain = client_for(SMTPServerProtocol)
        assert [b"500 Command not recognized"] == plain.command(b"XHELLO world")

    def test_new_verb_still_needs_tls_when_required(self, certificates) -> None:
        """A subclass verb passes the same TLS gate as MAIL."""
        from twisted_smtpd.tls import TLSPolicy

        class Hello(SMTPServerProtocol):
            def do_XHELLO(self, argument: str) -> None:
                self.reply(R250_OK)

        tls = TLSPolicy.from_files(
            certificates["cert"], certificates["key"], required=True
        )
        client = client_for(Hello, tls=tls)
        client.command(b"EHLO c.example")
        assert client.command(b"XHELLO")[0].startswith(b"530 ")


class TestLines:
    def test_max_length_and_line_length_exceeded(self) -> None:
        """MAX_LENGTH bounds a line; lineLengthExceeded gets it."""
        seen = []

        class Short(SMTPServerProtocol):
            MAX_LENGTH = 20

            def lineLengthExceeded(self, line: bytes) -> None:
                seen.append(line)
                super().lineLengthExceeded(line)

        client = client_for(Short)
        client.command(b"EHLO c.example")
        assert [b"500 5.5.2 Line too long"] == client.command(b"NOOP " + b"x" * 55)
        assert [b"NOOP " + b"x" * 55] == seen
        assert [b"250 2.0.0 OK"] == client.command(b"NOOP")
        # A partial line over the bound is dropped up to its CRLF.
        client.send(b"NOOP " + b"y" * 40)
        client.send(b"z" * 40 + b"\r\nNOOP\r\n")
        assert [b"500 5.5.2 Line too long", b"250 2.0.0 OK"] == client.replies()

    def test_max_length_defaults_to_the_limits(self) -> None:
        """Without a subclass value, MAX_LENGTH is the longest line Limits allow."""
        from twisted_smtpd import Limits

        client = client_for(SMTPServerProtocol, limits=Limits(max_auth_line=2000))
        assert 2000 == client.protocol.MAX_LENGTH

    def test_send_line_keeps_the_order(self) -> None:
        """sendLine from lineReceived comes after the replies before it."""

        class Echo(SMTPServerProtocol):
            def lineReceived(self, line: bytes) -> None:
                if line.startswith(b"ECHO "):
                    self.sendLine(b"250 " + line[5:])
                else:
                    super().lineReceived(line)

        client = client_for(Echo)
        client.send(b"NOOP\r\nECHO hi\r\nNOOP\r\n")
        assert [b"250 OK", b"250 hi", b"250 OK"] == client.replies()

    def test_pause_producing_stops_buffered_lines(self) -> None:
        """pauseProducing stops dispatch, even of lines already received."""

        class Waiter(SMTPServerProtocol):
            def do_XWAIT(self, argument: str) -> None:
                self.pauseProducing()

        client = client_for(Waiter)
        client.send(b"XWAIT\r\nNOOP\r\nNOOP\r\n")
        assert [] == client.replies()
        assert "paused" == client.transport.producerState
        client.protocol.reply(R250_OK)
        client.protocol.resumeProducing()
        assert [b"250 OK", b"250 OK", b"250 OK"] == client.replies()
        assert "producing" == client.transport.producerState

    def test_raw_mode(self) -> None:
        """setRawMode sends bytes to rawDataReceived; setLineMode(extra) resumes."""
        received = []

        class Raw(SMTPServerProtocol):
            def do_XRAW(self, argument: str) -> None:
                self.reply(Reply(354, "", "raw until END"))
                self.setRawMode()

            def rawDataReceived(self, data: bytes) -> None:
                received.append(data)
                joined = b"".join(received)
                if b"END" in joined:
                    before, _, after = joined.partition(b"END")
                    received[:] = [before]
                    self.reply(R250_OK)
                    self.setLineMode(after)

        client = client_for(Raw)
        client.send(b"XRAW\r\nab")
        client.send(b"c\r\nNOOP\r\nENDNOOP\r\nNOOP\r\n")
        assert [b"354 raw until END", b"250 OK", b"250 OK", b"250 OK"] == (
            client.replies()
        )
        assert [b"abc\r\nNOOP\r\n"] == received

    def test_clear_line_buffer(self) -> None:
        """clearLineBuffer drops the lines still waiting, and returns them."""
        dropped = []

        class Clearing(SMTPServerProtocol):
            def do_XCLEAR(self, argument: str) -> None:
                dropped.append(self.clearLineBuffer())
                self.reply(R250_OK)

        client = client_for(Clearing)
        client.send(b"XCLEAR\r\nNOOP\r\nNOOP\r\n")
        assert [b"250 OK"] == client.replies()
        assert [b"NOOP\r\nNOOP\r\n"] == dropped


def test_documented_example() -> None:
    """docs/examples/hello_verb.py (shown in docs/subclassing.rst) works as told."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "docs" / "examples" / "hello_verb.py"
    spec = importlib.util.spec_from_file_location("hello_verb", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.factory.reactor = Clock()
    client = connect(example.factory)
    client.replies()
    client.command(b"EHLO c.example")
    assert [b"250 2.0.0 Hello world"] == client.command(b"XHELLO world")
    assert [b"502 5.5.1 VRFY is off here"] == client.command(b"VRFY bob")
    assert [b"250 2.1.0 Sender OK"] == client.command(b"MAIL FROM:<a@b.example>")


def test_a_subclass_reply_sees_and_may_rewrite_the_banner() -> None:
    """The 220 goes through reply() like every other reply (a subclass that
    overrides it sees the greeting and may change it)."""
    seen: list[int] = []

    class Branded(SMTPServerProtocol):
        def reply(self, reply: Reply) -> None:
            seen.append(reply.code)
            if reply.code == 220:
                reply = reply.with_text("mx.test ESMTP ready")
            super().reply(reply)

    factory = SMTPFactory(MemoryHandler(), hostname="mx.test", reactor=Clock())
    factory.protocol = Branded
    client = connect(factory)
    assert [b"220 mx.test ESMTP ready"] == client.replies()
    assert [220] == seen


def test_a_subclass_reply_sees_the_ehlo_reply_as_sent() -> None:
    """EHLO's reply (sent as cached bytes) reaches a subclass's reply() as
    one multi-line Reply, and the client gets the same bytes either way."""
    seen: list[Reply] = []

    class Watching(SMTPServerProtocol):
        def reply(self, reply: Reply) -> None:
            seen.append(reply)
            super().reply(reply)

    def ehlo(protocol: type[SMTPServerProtocol]) -> list[bytes]:
        factory = SMTPFactory(MemoryHandler(), hostname="mx.test", reactor=Clock())
        factory.protocol = protocol
        client = connect(factory)
        client.replies()
        return client.command(b"EHLO client.example")

    plain = ehlo(SMTPServerProtocol)
    assert plain == ehlo(Watching)
    assert [220, 250] == [reply.code for reply in seen]
    assert plain[0] == b"250-" + seen[1].text.split("\n")[0].encode()
    assert b"250 HELP" == plain[-1]
