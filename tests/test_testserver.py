"""twisted_smtpd.testserver: the server behind the pytest plugin and trial mixin.

Fast tests drive the recording wrapper and the fault rules over a string
transport with a Clock; the rest use real sockets in both modes (the plugin
itself is tested through pytester in test_pytest_plugin.py).
"""

from __future__ import annotations

import smtplib
import socket
import ssl

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from twisted_smtpd import testserver
from twisted_smtpd.testserver import SMTPTestServer, start_server

MESSAGE = b"Subject: hello\r\nTo: b@x.test\r\n\r\nbody\r\n"


class Wire:
    """One session of a Clock-driven server over a string transport."""

    def __init__(self, server: SMTPTestServer, port: int = 40000) -> None:
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 25),
            peerAddress=IPv4Address("TCP", "127.0.0.1", port),
        )
        self.protocol = server._factory.buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)
        self._seen = 0

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def output(self) -> bytes:
        value = self.transport.value()
        new, self._seen = value[self._seen :], len(value)
        return new

    def replies(self) -> list[bytes]:
        return [line for line in self.output().split(b"\r\n") if line]

    def command(self, line: bytes) -> list[bytes]:
        self.send(line + b"\r\n")
        return self.replies()

    def envelope(self, *recipients: bytes) -> list[bytes]:
        """EHLO, MAIL and RCPTs; the last reply of each."""
        answers = [self.command(b"EHLO client.test")[-1]]
        answers.append(self.command(b"MAIL FROM:<a@x.test>")[-1])
        for recipient in recipients:
            answers.append(self.command(b"RCPT TO:<" + recipient + b">")[-1])
        return answers

    def data(self, body: bytes = MESSAGE) -> list[bytes]:
        self.command(b"DATA")
        self.send(body + b".\r\n")
        return self.replies()

    def lose(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.protocol.connectionLost(Failure(ConnectionDone()))


@pytest.fixture
def server(clock: Clock) -> SMTPTestServer:
    return SMTPTestServer(clock)


@pytest.fixture
def wire(server: SMTPTestServer) -> Wire:
    wire = Wire(server)
    assert wire.replies()[0].startswith(b"220 localhost ESMTP")
    return wire


# -- messages and transcripts ----------------------------------------------------
def test_message_is_parsed_with_its_envelope(server, wire):
    wire.envelope(b"b@x.test", b"c@x.test")
    assert wire.data()[-1].startswith(b"250 2.0.0")
    [message] = server.messages
    assert message["Subject"] == "hello"
    assert message.get_content() == "body\n"
    assert message.envelope.rcpt_tos == ["b@x.test", "c@x.test"]
    assert message.envelope.content == MESSAGE  # the wire bytes, CRLF


def test_transcript_has_both_directions_and_the_message(server, wire):
    wire.envelope(b"b@x.test")
    wire.data()
    wire.command(b"QUIT")
    wire.lose()
    [session] = server.sessions
    assert session.peer == "127.0.0.1:40000"
    assert session.lines[0] == "S: 220 localhost ESMTP twisted_smtpd test server ready"
    assert "C: RCPT TO:<b@x.test>" in session.lines
    assert "S: 250 2.1.5 Recipient OK" in session.lines
    index = session.lines.index("C: Subject: hello")
    assert session.lines[index : index + 4] == [
        "C: Subject: hello",
        "C: To: b@x.test",
        "C: ",
        "C: body",
    ]
    assert session.lines[-1].startswith("* closed")
    assert str(session).startswith("--- session 1 from 127.0.0.1:40000 ---\nS: 220")


def test_transcript_keeps_a_bounded_number_of_lines(server, wire, monkeypatch):
    monkeypatch.setattr(testserver, "_MAX_LINES", 5)
    for _ in range(10):
        wire.command(b"NOOP")
    [session] = server.sessions
    assert len(session.lines) == 5
    assert session.dropped == 16  # a greeting, 10 NOOPs, 10 replies; 5 kept
    assert str(session).endswith("... 16 more lines not kept")


def test_clear_forgets_messages_sessions_and_counts(server, wire):
    server.fail("data", 451, "4.3.0", "second", nth=2)
    wire.envelope(b"b@x.test")
    assert wire.data()[-1].startswith(b"250")
    server.clear()
    assert server.messages == [] and server.sessions == []
    wire.envelope(b"b@x.test")
    assert wire.data()[-1].startswith(b"250")  # the count began again: 1st
    wire.envelope(b"b@x.test")
    assert wire.data()[-1] == b"451 4.3.0 second"


def test_wait_for_in_reactor_mode(server, wire, clock):
    timers = len(clock.getDelayedCalls())
    waiting = server.wait_for(2, timeout=10)
    assert len(clock.getDelayedCalls()) == timers + 1
    results: list = []
    waiting.addBoth(results.append)
    wire.envelope(b"b@x.test")
    wire.data()
    assert results == []
    wire.envelope(b"b@x.test")
    wire.data()
    [messages] = results
    assert len(messages) == 2
    assert len(clock.getDelayedCalls()) == timers  # its timeout was cancelled


def test_wait_for_times_out_in_reactor_mode(server, clock):
    failures: list = []
    server.wait_for(1, timeout=3).addErrback(failures.append)
    clock.advance(2.9)
    assert failures == []
    clock.advance(0.1)
    [failure] = failures
    assert failure.check(TimeoutError)
    assert "got 0" in str(failure.value)


def test_wait_for_match_counts_only_matching(server, wire):
    done: list = []
    server.wait_for(1, match=lambda m: m["Subject"] == "two").addCallback(done.append)
    wire.envelope(b"b@x.test")
    wire.data()
    assert done == []
    wire.envelope(b"b@x.test")
    wire.data(b"Subject: two\r\n\r\nx\r\n")
    assert [[m["Subject"] for m in found] for found in done] == [["two"]]


# -- fault rules -----------------------------------------------------------------
def test_fail_per_recipient_pattern(server, wire):
    server.fail("rcpt", 550, "5.1.1", "No such user", match=r"^nobody@")
    assert wire.envelope(b"nobody@x.test", b"NOBODY@y.test", b"ann@x.test")[2:] == [
        b"550 5.1.1 No such user",
        b"550 5.1.1 No such user",  # case-insensitive
        b"250 2.1.5 Recipient OK",
    ]


def test_fail_with_a_callable_match(server, wire):
    server.fail("mail", 553, "5.7.1", "Not you", match=lambda s: s.endswith(".test"))
    assert wire.envelope()[1] == b"553 5.7.1 Not you"


def test_fail_at_connect_refuses_the_greeting(server):
    server.fail("connect", 554, "5.7.1", "Go away", match=r"^127\.")
    wire = Wire(server)
    assert wire.replies() == [b"554 Go away"]  # no enhanced code before EHLO
    assert wire.transport.disconnecting


def test_fail_nth_and_times(server, wire):
    server.fail("rcpt", 452, "4.2.2", "third", nth=3)
    server.fail("rcpt", 451, "4.3.0", "once", times=1)
    assert wire.envelope(b"a@x", b"b@x", b"c@x", b"d@x")[2:] == [
        b"451 4.3.0 once",
        b"250 2.1.5 Recipient OK",
        b"452 4.2.2 third",
        b"250 2.1.5 Recipient OK",
    ]


def test_first_matching_reply_rule_wins_and_spends_only_itself(server, wire):
    server.fail("rcpt", 550, "5.1.1", "first", times=1)
    server.fail("rcpt", 551, "5.1.6", "second", times=1)
    assert wire.envelope(b"a@x", b"b@x", b"c@x")[2:] == [
        b"550 5.1.1 first",
        b"551 5.1.6 second",
        b"250 2.1.5 Recipient OK",
    ]


def test_fail_data_does_not_keep_the_message(server, wire):
    server.fail("data", 554, "5.6.0", "Bad content", match=r"^Subject: hello")
    wire.envelope(b"b@x.test")
    assert wire.data()[-1] == b"554 5.6.0 Bad content"
    assert server.messages == []


def test_unknown_phase_is_refused(server):
    with pytest.raises(ValueError, match="phase must be one of"):
        server.fail("helo", 550, "5.0.0", "x")


def test_greylist_refuses_each_new_triple_once(server, wire):
    server.greylist()
    assert wire.envelope(b"b@x.test", b"b@x.test", b"c@x.test")[2:] == [
        b"451 4.7.1 Greylisted, please try again later",
        b"250 2.1.5 Recipient OK",
        b"451 4.7.1 Greylisted, please try again later",
    ]
    server.clear_faults()
    assert wire.command(b"RCPT TO:<d@x.test>") == [b"250 2.1.5 Recipient OK"]


def test_delay_holds_the_reply(server, wire, clock):
    server.delay("mail", 5)
    wire.command(b"EHLO client.test")
    assert wire.command(b"MAIL FROM:<a@x.test>") == []
    clock.advance(4.9)
    assert wire.replies() == []
    clock.advance(0.1)
    assert wire.replies() == [b"250 2.1.0 Sender OK"]


def test_delay_then_reply_rule(server, wire, clock):
    server.delay("rcpt", 2)
    server.fail("rcpt", 450, "4.2.0", "Busy")
    wire.envelope()
    assert wire.command(b"RCPT TO:<b@x.test>") == []
    clock.advance(2)
    assert wire.replies() == [b"450 4.2.0 Busy"]


def test_stop_answers_a_held_reply_without_logging_a_failure(server, wire, clock):
    from twisted.logger import globalLogPublisher

    failures: list = []

    def observe(event: dict) -> None:
        if "log_failure" in event:
            failures.append(event)

    server.delay("mail", 60)
    wire.command(b"EHLO client.test")
    assert wire.command(b"MAIL FROM:<a@x.test>") == []
    globalLogPublisher.addObserver(observe)
    try:
        server._stop_in_reactor()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert wire.replies() == [b"421 4.3.2 Test server stopping"]
    assert failures == []  # trial would fail a test on a logged failure
    assert wire.transport.disconnected
    assert all(
        "fire" not in repr(call) for call in clock.getDelayedCalls()
    )  # the delay's timer is gone


def test_hold_until_release(server, wire):
    server.hold("data")
    seen: list = []
    server.wait_held(1).addCallback(seen.append)
    wire.envelope(b"b@x.test")
    assert wire.data() == []
    assert server.held == 1 and seen == [1]
    assert server.messages == []
    assert server.release() == 1
    assert wire.replies()[-1].startswith(b"250 2.0.0")
    assert len(server.messages) == 1 and server.held == 0


def test_hold_then_reply_rule_answers_the_error_on_release(server, wire):
    server.hold("rcpt", match="^b@")
    server.fail("rcpt", 550, "5.1.1", "No such user", match="^b@")
    wire.envelope()
    assert wire.command(b"RCPT TO:<b@x.test>") == []
    server.release()
    assert wire.replies() == [b"550 5.1.1 No such user"]


def test_stop_answers_held_replies(server, wire):
    server.hold("mail")
    wire.command(b"EHLO client.test")
    wire.command(b"MAIL FROM:<a@x.test>")
    server._stop_in_reactor()
    assert wire.replies() == [b"421 4.3.2 Test server stopping"]
    assert server.held == 0


def test_disconnect_drops_without_a_reply(server, wire):
    server.disconnect("rcpt", match="^b@")
    wire.envelope()
    assert wire.command(b"RCPT TO:<b@x.test>") == []
    assert wire.transport.disconnecting
    # abortConnection (StringTransport marks it "disconnected"): like a crash
    assert wire.transport.disconnected
    wire.send(b"RSET\r\n")  # whatever arrives meanwhile is ignored
    assert wire.output() == b""
    assert server.sessions[0].lines[-1] == "* connection dropped: fault rule at rcpt"


def test_disconnect_after_the_dot(server, wire):
    server.disconnect("data")
    wire.envelope(b"b@x.test")
    assert wire.data() == []
    assert wire.transport.disconnected
    assert server.messages == []


def test_throttle_paces_output(server, clock):
    server.throttle(100)  # 10 bytes per 0.1 s tick
    wire = Wire(server)
    greeting = b"220 localhost ESMTP twisted_smtpd test server ready\r\n"
    assert wire.output() == greeting[:10]
    clock.advance(0.1)
    assert wire.output() == greeting[10:20]
    clock.pump([0.1] * 10)
    assert wire.output() == greeting[20:]


def test_throttle_paces_input_and_pauses_reading(server, wire, clock):
    server.throttle(100)
    wire.send(b"NOOP\r\n" * 5)  # 30 bytes: 10 now, 10 per tick
    assert wire.transport.producerState == "paused"
    assert wire.protocol.wrappedProtocol.session is not None
    clock.pump([0.1, 0.1])
    assert wire.transport.producerState == "producing"  # all 30 delivered
    clock.pump([0.1] * 20)
    assert b"".join(wire.transport.value().split(b"\r\n")[1:]).count(b"250") == 5
    server.throttle(None)
    wire.output()
    assert wire.command(b"NOOP") == [b"250 OK"]


def test_throttle_holds_the_rate_across_separate_reads(server, wire, clock):
    server.throttle(100)
    clock.advance(10)
    wire.send(b"NOOP\r\nNOOP")  # 10 bytes: the budget of one tick, at once
    assert wire.replies() == [b"250 OK"]
    wire.send(b"\r\n")  # the buffer was empty, yet the rate holds
    assert wire.replies() == []
    clock.advance(0.1)
    assert wire.replies() == [b"250 OK"]


def test_throttle_lets_the_starttls_reply_out_before_the_handshake(clock):
    server = SMTPTestServer(clock, tls="starttls")
    from twisted_smtpd.testing import TLSStringTransport

    transport = TLSStringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 25),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40001),
    )
    protocol = server._factory.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    server.throttle(10)  # a byte per tick
    protocol.dataReceived(b"EHLO x\r\n")
    clock.pump([0.1] * 400)
    transport.clear()
    protocol.dataReceived(b"STARTTLS\r\n")
    clock.pump([0.1] * 10)  # the command trickles in; the 220 would trickle out
    assert transport.value() == b"220 2.0.0 Ready to start TLS\r\n"
    assert transport.tls_context is not None
    from twisted.internet.interfaces import ISSLTransport

    assert ISSLTransport.providedBy(protocol)  # the session sees TLS


def test_options_are_checked(clock):
    with pytest.raises(ValueError, match="tls must be"):
        SMTPTestServer(clock, tls="yes")
    with pytest.raises(ValueError, match="require_tls needs"):
        SMTPTestServer(clock, require_tls=True)
    with pytest.raises(ValueError, match="require_auth needs"):
        SMTPTestServer(clock, require_auth=True)
    with pytest.raises(ValueError, match="positive"):
        SMTPTestServer(clock).throttle(0)
    with pytest.raises(ValueError, match="no TLS"):
        SMTPTestServer(clock).ssl_context  # noqa: B018


def test_limits_options(clock):
    server = SMTPTestServer(clock, max_message_size=100, max_recipients=1)
    wire = Wire(server)
    ehlo = wire.command(b"EHLO x")
    assert b"250-SIZE 100" in ehlo
    wire.command(b"MAIL FROM:<a@x>")
    assert wire.command(b"RCPT TO:<b@x>") == [b"250 2.1.5 Recipient OK"]
    assert wire.command(b"RCPT TO:<c@x>")[0].startswith(b"452 4.5.3")


# -- real sockets ----------------------------------------------------------------
@pytest.fixture
def threaded():
    servers = []

    def start(**options):
        server = start_server(**options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_thread_mode_uses_a_private_reactor(threaded):
    from twisted.internet import reactor as global_reactor

    server = threaded()
    assert server.threaded and server.reactor is not global_reactor
    # Under pytest-twisted this test body runs inside the global reactor:
    # only a server in another thread can answer a blocking client.
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.sendmail("a@x.test", ["b@x.test"], MESSAGE)
    assert server.wait_for(1, timeout=10)[0]["Subject"] == "hello"


def test_thread_mode_starttls_and_implicit_tls(threaded):
    # STARTTLS in the private reactor needs its TLS writes scheduled there.
    server = threaded(tls="starttls", auth={"ann": "pw"})
    with smtplib.SMTP("localhost", server.port, timeout=10) as client:
        client.starttls(context=server.ssl_context)
        client.login("ann", "pw")
        client.sendmail("a@x.test", ["b@x.test"], MESSAGE)
    [message] = server.wait_for(1, timeout=10)
    assert message.envelope.auth == "ann" and message.envelope.tls is not None
    implicit = threaded(tls="implicit")
    with smtplib.SMTP_SSL(
        implicit.host, implicit.port, context=implicit.ssl_context, timeout=10
    ) as client:
        client.sendmail("a@x.test", ["b@x.test"], MESSAGE)
    assert implicit.wait_for(1, timeout=10)[0].envelope.tls.protocol.startswith("TLS")


def test_certificate_is_verified_for_ip_and_name_only(threaded):
    server = threaded(tls="implicit")
    for name in ("localhost", "127.0.0.1"):
        with socket.create_connection(server.address, timeout=10) as raw:
            with server.ssl_context.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.recv(4) == b"220 "
    with socket.create_connection(server.address, timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            server.ssl_context.wrap_socket(raw, server_hostname="mx.example.org")
    with socket.create_connection(server.address, timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")


def test_stop_closes_open_sessions(threaded):
    server = threaded()
    client = smtplib.SMTP(server.host, server.port, timeout=10)
    client.ehlo()
    server.stop()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()
    with pytest.raises(OSError):
        socket.create_connection(server.address, timeout=10)


def test_wait_for_blocks_until_the_message_arrives(threaded):
    server = threaded()
    server.delay("data", 0.3)
    import threading

    def send():
        with smtplib.SMTP(server.host, server.port, timeout=10) as client:
            client.sendmail("a@x.test", ["b@x.test"], MESSAGE)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        assert len(server.wait_for(1, timeout=10)) == 1
    finally:
        sender.join(10)


def test_hold_in_thread_mode(threaded):
    import threading

    server = threaded()
    server.hold("rcpt")
    refused: list = []

    def send():
        with smtplib.SMTP(server.host, server.port, timeout=10) as client:
            refused.append(client.sendmail("a@x.test", ["b@x.test"], MESSAGE))

    sender = threading.Thread(target=send)
    sender.start()
    try:
        assert server.wait_held(1, timeout=10) == 1  # the client now waits
        assert server.messages == [] and sender.is_alive()
        server.clear_faults()  # later RCPTs are not held; this one still is
        assert server.release() == 1
        assert len(server.wait_for(1, timeout=10)) == 1
    finally:
        sender.join(10)
    assert refused == [{}]


@pytest_twisted.inlineCallbacks
def test_reactor_mode_under_pytest_twisted():
    from twisted.internet import reactor
    from twisted.mail.smtp import sendmail

    server = start_server(mode="reactor")
    try:
        assert not server.threaded and server.reactor is reactor
        server.fail("rcpt", 550, "5.1.1", "No such user", match="^nobody@")
        yield sendmail(
            server.host,
            "a@x.test",
            ["nobody@x.test", "b@x.test"],
            MESSAGE,
            port=server.port,
            requireTransportSecurity=False,
        )
        [message] = yield server.wait_for(1)
        assert message.envelope.rcpt_tos == ["b@x.test"]
        assert "S: 550 5.1.1 No such user" in server.transcript
    finally:
        yield server.stop()
