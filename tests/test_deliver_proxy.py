"""The proxy machinery behind lmtp:/smtp: (our own server as the next hop)."""

from __future__ import annotations

import smtplib
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.protocols.basic import LineReceiver

from twisted_smtpd import Limits, SMTPError
from twisted_smtpd.deliver._proxy import (
    DownstreamReply,
    combine_lmtp_replies,
    parse_reply_line,
)
from twisted_smtpd.deliver.smtp import SMTPRelayHandler
from twisted_smtpd.handlers import MemoryHandler


def in_thread(fn, *args):
    return threads.deferToThread(fn, *args)


@pytest.fixture
def relay():
    made = []

    def make(port, **kwargs):
        kwargs.setdefault("timeout", 10)
        kwargs.setdefault("helo", "mx.test")
        handler = SMTPRelayHandler(f"tcp:127.0.0.1:{port}", **kwargs)
        made.append(handler)
        return handler

    yield make
    for handler in made:
        handler.pool.close()


def until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


# -- pure pieces ------------------------------------------------------------------
def test_reply_lines():
    assert (250, True, "PIPELINING") == parse_reply_line("250-PIPELINING")
    assert (550, False, "5.1.1 no") == parse_reply_line("550 5.1.1 no")
    assert (250, False, "") == parse_reply_line("250")
    for bad in ("25", "abc def", "250+x"):
        with pytest.raises(ValueError):
            parse_reply_line(bad)


def test_downstream_421_becomes_451_and_bad_enhanced_codes_are_fixed():
    assert (451, "4.4.2") == (lambda r: (r.code, r.enhanced))(
        DownstreamReply(421, "4.4.2", ("closing",)).as_reply()
    )
    reply = DownstreamReply(550, "4.1.1", ("odd",)).as_reply()
    assert (550, "5.0.0", "odd") == (reply.code, reply.enhanced, reply.text)


def ok(text="2.0.0 Saved"):
    return DownstreamReply(250, "2.0.0", (text,))


def failed(code, enhanced, text):
    return DownstreamReply(code, enhanced, (text,))


def outcome(replies):
    rcpts = [f"r{i}@x" for i in range(len(replies))]
    try:
        combine_lmtp_replies("lmtp", rcpts, replies)
    except SMTPError as error:
        return error.reply.code, error.reply.enhanced, error.reply.text
    return 250


def test_lmtp_results_never_claim_more_than_delivered():
    assert 250 == outcome([ok(), ok()])
    assert (451, "4.2.2", "over quota") == outcome(
        [failed(452, "4.2.2", "over quota"), failed(550, "5.1.1", "gone")]
    )
    assert (552, "5.2.2", "full") == outcome([failed(552, "5.2.2", "full")] * 2)
    code, enhanced, text = outcome([ok(), failed(552, "5.2.2", "full")])
    assert (554, "5.5.0") == (code, enhanced)
    assert "<r0@x> only" in text and "<r1@x>: 552 5.2.2 full" in text
    code, enhanced, text = outcome(
        [ok(), failed(451, "4.3.0", "later"), failed(550, "5.1.1", "x")]
    )
    assert (451, "4.5.0") == (code, enhanced) and "<r0@x> only" in text


# -- through a real next hop (our own server) -------------------------------------
@pytest_twisted.inlineCallbacks
def test_bdat_goes_on_as_stuffed_data_with_a_final_crlf(listen, relay):
    """BDAT chunks that split '\\r\\n.' and lack a final CRLF arrive intact;
    a bare LF goes on as CRLF (no line a lenient next hop could see alone)."""
    memory = MemoryHandler()
    port = listen(relay(listen(memory)))
    chunks = [b"Subject: b\r\n\r\nhello\r", b"\n.dot\r\n\n.bare-lf\r\nend"]

    def client():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            reader = sock.makefile("rb")
            sock.sendall(
                b"EHLO c.example\r\nMAIL FROM:<s@example.org>\r\n"
                b"RCPT TO:<a@example.net>\r\n"
            )
            sock.sendall(b"BDAT %d\r\n%s" % (len(chunks[0]), chunks[0]))
            sock.sendall(b"BDAT %d LAST\r\n%s" % (len(chunks[1]), chunks[1]))
            finals = []
            while len(finals) < 6:
                line = reader.readline()
                if line[3:4] == b" ":
                    finals.append(line)
            return finals

    finals = yield in_thread(client)
    assert finals[-1].startswith(b"250 "), finals
    (envelope,) = memory.messages
    assert envelope.content.endswith(
        b"Subject: b\r\n\r\nhello\r\n.dot\r\n\r\n.bare-lf\r\nend\r\n"
    )


@pytest_twisted.inlineCallbacks
def test_refused_data_sends_no_body(listen, relay):
    """The next hop refuses DATA: the client's bytes are never sent to it
    (they would be read as commands) and the client gets its reply."""

    class RefuseData:
        def __init__(self):
            self.senders = []

        def check_sender(self, envelope):
            self.senders.append(envelope.mail_from)

        def open_message(self, envelope):
            raise SMTPError(554, "5.7.1", "no data today")

    refuse = RefuseData()
    downstream = listen(refuse)
    handler = relay(downstream)
    port = listen(handler)

    body = b"MAIL FROM:<smuggled@example.org>\r\nRCPT TO:<x@example.net>\r\n"

    def client():
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            try:
                smtp.sendmail("s@example.org", ["a@example.net"], body)
            except smtplib.SMTPDataError as error:
                return error.smtp_code, error.smtp_error
            return 250, b""

    # The sender sees the refusal; the connection stays usable for the next.
    assert (554, b"5.7.1 no data today") == (yield in_thread(client))
    assert (554, b"5.7.1 no data today") == (yield in_thread(client))
    assert 1 == handler.pool.open
    yield in_thread(time.sleep, 0.2)
    assert ["s@example.org", "s@example.org"] == refuse.senders


@pytest_twisted.inlineCallbacks
def test_bounded_pool_serves_many_clients(listen, relay):
    """20 clients at once through 2 connections: every message lands once."""
    memory = MemoryHandler()
    handler = relay(listen(memory), pool_size=2)
    port = listen(handler)

    def one(i):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.sendmail("s@example.org", [f"r{i}@example.net"], b"n=%d\r\n" % i)

    def clients():
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(one, range(20)))

    yield in_thread(clients)
    assert sorted(f"r{i}@example.net" for i in range(20)) == sorted(
        e.rcpt_tos[0] for e in memory.messages
    )
    assert handler.pool.open <= 2


def telling(handler, count):
    """Deferreds that fire, in turn, when C{transaction_abandoned} has run
    and the downstream it released is back in the pool."""
    from twisted.internet import reactor

    told_for = []
    # Bounded: a hook that is never called fails the test, never hangs it.
    waiting = [Deferred().addTimeout(20, reactor) for _ in range(count)]
    told = handler.transaction_abandoned

    def spy(envelope):
        done = waiting[len(told_for)]
        told_for.append(envelope)
        reset = told(envelope)
        reset.addCallback(lambda _: done.callback(envelope))
        return reset

    handler.transaction_abandoned = spy
    return waiting


@pytest_twisted.inlineCallbacks
def test_lost_client_after_rcpt_gives_the_connection_back(listen, relay):
    """A client that vanishes after RCPT: the server's transaction_abandoned
    resets the downstream transaction and its connection is reused."""
    memory = MemoryHandler()
    handler = relay(listen(memory))
    released = telling(handler, 1)
    port = listen(handler)

    def vanish():
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        reader = sock.makefile("rb")
        sock.sendall(
            b"EHLO c\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<a@x.example>\r\n"
        )
        seen = 0
        while seen < 3:  # greeting, EHLO, MAIL ... wait for the RCPT reply
            line = reader.readline()
            if line[3:4] == b" ":
                seen += 1
        reader.readline()
        reader.close()
        sock.close()

    yield in_thread(vanish)
    envelope = yield released[0]
    assert ["a@x.example"] == envelope.rcpt_tos
    assert 1 == handler.pool.idle_count and 1 == handler.pool.open
    assert {} == handler._transactions

    def client():
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.sendmail("s@example.org", ["b@x.example"], b"after\r\n")

    yield in_thread(client)
    assert ["b@x.example"] == [r for e in memory.messages for r in e.rcpt_tos]
    assert 1 == handler.pool.open


@pytest_twisted.inlineCallbacks
def test_rset_quit_and_ehlo_give_the_connection_back(listen, relay):
    """Each way a client drops a transaction before DATA: the downstream
    is reset and its one connection serves the next transaction."""
    memory = MemoryHandler()
    handler = relay(listen(memory))
    released = telling(handler, 3)
    port = listen(handler)

    def rset_then_ehlo():
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo("c.example")
            smtp.mail("s@example.org")
            smtp.rcpt("a@x.example")
            smtp.rset()
            smtp.mail("s@example.org")
            smtp.rcpt("b@x.example")
            smtp.ehlo("again.example")

    def quit_after_rcpt():
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
        smtp.ehlo("c.example")
        smtp.mail("s@example.org")
        smtp.rcpt("c@x.example")
        smtp.quit()

    yield in_thread(rset_then_ehlo)
    yield in_thread(quit_after_rcpt)
    abandoned = []
    for waiting in released:
        envelope = yield waiting
        abandoned += envelope.rcpt_tos
    assert ["a@x.example", "b@x.example", "c@x.example"] == abandoned
    assert 1 == handler.pool.open and 1 == handler.pool.idle_count
    assert [] == memory.messages


class SlowNextHop(MemoryHandler):
    """A next hop whose MAIL or RCPT answers only after C{delay} seconds."""

    def __init__(self, slow, delay=0.3):
        super().__init__()
        self.slow = slow
        self.delay = delay

    def _later(self):
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        return deferLater(reactor, self.delay, lambda: None)

    def check_sender(self, envelope):
        return self._later() if self.slow == "MAIL" else None

    def check_recipient(self, envelope, address, options):
        return self._later() if self.slow == "RCPT" else None


def vanish_after(port, verbs, answered=0):
    """Send EHLO and C{verbs} pipelined, read the replies to EHLO and the
    first C{answered} verbs, and go."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = sock.makefile("rb")
    sock.sendall(b"EHLO c\r\n" + b"".join(v + b"\r\n" for v in verbs))
    seen = 0
    while seen < 2 + answered:  # the greeting, EHLO, then the verbs
        line = reader.readline()
        assert line[:1] in (b"2", b"3"), line
        if line[3:4] == b" ":
            seen += 1
    reader.close()
    sock.close()


@pytest.mark.parametrize("slow", ["MAIL", "RCPT"])
@pytest_twisted.inlineCallbacks
def test_client_gone_while_the_next_hop_answers(listen, relay, slow):
    """The client leaves while the next hop still answers its MAIL or RCPT:
    the transaction is told abandoned once the hook answers (for MAIL, as
    soon as it began), the next hop reset, the connection reused."""
    memory = SlowNextHop(slow)
    handler = relay(listen(memory))
    released = telling(handler, 1)
    port = listen(handler)
    yield in_thread(
        vanish_after, port, [b"MAIL FROM:<s@example.org>", b"RCPT TO:<a@x.example>"]
    )
    envelope = yield released[0]
    assert "s@example.org" == envelope.mail_from
    assert 1 == handler.pool.idle_count and 1 == handler.pool.open

    def client():
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.sendmail("s@example.org", ["b@x.example"], b"after\r\n")

    yield in_thread(client)
    assert [["b@x.example"]] == [e.rcpt_tos for e in memory.messages]
    assert 1 == handler.pool.open


@pytest_twisted.inlineCallbacks
def test_next_hop_that_stops_reading_is_451(listen, relay):
    """The next hop stops reading mid-body: after --deliver-timeout the
    client is resumed, its data drained, and it gets 451; nothing stored."""

    class Stuck:
        stored = 0

        def open_message(self, envelope):
            outer = self

            class Receiver:
                def registerProducer(self, producer, streaming):
                    producer.pauseProducing()  # and never resume

                def unregisterProducer(self):
                    pass

                def write(self, data):
                    pass

                def finish(self):
                    outer.stored += 1

                def abort(self):
                    pass

            return Receiver()

    stuck = Stuck()
    big = Limits(max_message_size=256 * 1024 * 1024)
    handler = relay(listen(stuck, limits=big), timeout=1)
    port = listen(handler, limits=big)
    line = b"x" * 998 + b"\r\n"
    payload = line * (48 * 1024)  # 48 MB: more than any socket buffers

    def client():
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
            try:
                smtp.sendmail("s@example.org", ["a@example.net"], payload)
            except smtplib.SMTPDataError as error:
                return error.smtp_code, error.smtp_error
            return 250, b""

    code, text = yield in_thread(client)
    assert 451 == code and b"stopped reading" in text, text
    assert 0 == stuck.stored


@pytest_twisted.inlineCallbacks
def test_transaction_reaped_before_data_is_451_not_a_hang(listen, relay):
    """The borrowed connection was given back (idle client) before DATA:
    DATA still ends in an answer, a 451, never a wait."""
    memory = MemoryHandler()
    handler = relay(listen(memory))
    handler.idle_timeout = 0.2
    port = listen(handler)

    def client():
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
            smtp.ehlo("client.example")
            smtp.mail("s@example.org")
            smtp.rcpt("a@example.net")
            time.sleep(0.6)
            return smtp.data(b"late\r\n")

    code, text = yield in_thread(client)
    assert 451 == code and text.startswith(b"4.4.2"), text
    assert [] == memory.messages
    assert 1 == handler.pool.idle_count  # reset and kept for the next


class StrictServer(LineReceiver):
    """A minimal next hop like Postfix: a refused DATA keeps the transaction
    open, so a second MAIL without RSET is a 503."""

    delimiter = b"\r\n"

    def connectionMade(self):
        self.in_mail = False
        self.in_data = False
        self.sendLine(b"220 strict.test ESMTP")

    def lineReceived(self, line):
        if self.in_data:
            if line == b".":
                self.in_data = self.in_mail = False
                self.factory.stored += 1
                self.sendLine(b"250 2.0.0 stored")
            return
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-strict.test\r\n250 ENHANCEDSTATUSCODES")
        elif verb == b"MAIL":
            if self.in_mail:
                self.sendLine(b"503 5.5.1 Error: nested MAIL command")
            else:
                self.in_mail = True
                self.sendLine(b"250 2.1.0 Ok")
        elif verb == b"RCPT":
            self.sendLine(b"250 2.1.5 Ok")
        elif verb == b"DATA":
            if self.factory.refuse_data:
                self.factory.refuse_data -= 1
                self.sendLine(b"451 4.3.0 busy, try again")
            else:
                self.in_data = True
                self.sendLine(b"354 go ahead")
        elif verb == b"RSET":
            self.in_mail = False
            self.sendLine(b"250 2.0.0 Ok")
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"502 5.5.2 no")


@pytest_twisted.inlineCallbacks
def test_refused_data_resets_before_reuse(relay):
    """A DATA refused by the next hop leaves its transaction open there:
    it is reset before the connection serves the next MAIL."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    from twisted_smtpd import SMTPFactory

    strict = Factory.forProtocol(StrictServer)
    strict.stored, strict.refuse_data = 0, 1
    listener = reactor.listenTCP(0, strict, interface="127.0.0.1")
    handler = relay(listener.getHost().port, pool_size=1)
    front = reactor.listenTCP(
        0, SMTPFactory(handler, hostname="mx.test"), interface="127.0.0.1"
    )
    try:
        port = front.getHost().port
        first = yield in_thread(send_one, port, b"one\r\n")
        second = yield in_thread(send_one, port, b"two\r\n")
    finally:
        front.stopListening()
        listener.stopListening()
    assert (451, b"4.3.0 busy, try again") == first
    assert 250 == second[0], second
    assert 1 == strict.stored


def send_one(port, data):
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        try:
            smtp.sendmail("s@example.org", ["a@example.net"], data)
        except smtplib.SMTPResponseException as error:
            return error.smtp_code, error.smtp_error
        return 250, b""


@pytest_twisted.inlineCallbacks
def test_smtputf8_to_a_next_hop_without_it_is_refused_at_mail(relay):
    """SMTPUTF8 cannot be downgraded: 550 5.6.7 at MAIL, not a later bounce."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    from twisted_smtpd import SMTPFactory

    strict = Factory.forProtocol(StrictServer)
    strict.stored, strict.refuse_data = 0, 0
    listener = reactor.listenTCP(0, strict, interface="127.0.0.1")
    handler = relay(listener.getHost().port)
    front = reactor.listenTCP(
        0, SMTPFactory(handler, hostname="mx.test"), interface="127.0.0.1"
    )

    def client():
        with smtplib.SMTP("127.0.0.1", front.getHost().port, timeout=20) as smtp:
            smtp.ehlo("client.example")
            return smtp.mail("s@example.org", ["SMTPUTF8"])

    try:
        code, text = yield in_thread(client)
    finally:
        front.stopListening()
        listener.stopListening()
    assert 550 == code and text.startswith(b"5.6.7"), text
    assert 1 == handler.pool.idle_count  # the connection is fine for others


@pytest_twisted.inlineCallbacks
def test_a_cancelled_hook_drops_the_connection_cleanly(listen, relay):
    """A protocol deadline that cancels a pending RCPT: the downstream
    connection is dropped (its late reply could be matched to the wrong
    command) and the next client gets a fresh one."""
    from twisted.internet.address import IPv4Address

    from twisted_smtpd._session import Envelope

    slow = SlowHandlerForCancel()
    handler = relay(listen(slow))
    envelope = Envelope(
        session_id="C1",
        peer=IPv4Address("TCP", "127.0.0.1", 1),
        helo="c",
        esmtp=True,
        tls=None,
        auth=None,
        mail_from="s@example.org",
    )
    from twisted.internet.defer import CancelledError, Deferred

    yield Deferred.fromCoroutine(handler.check_sender(envelope))
    pending = Deferred.fromCoroutine(
        handler.check_recipient(envelope, "a@example.net", {})
    )
    pending.cancel()
    with pytest.raises((SMTPError, CancelledError)):
        yield pending
    yield in_thread(until, lambda: handler.pool.open == 0, 3.0)
    assert 0 == handler.pool.open


class SlowHandlerForCancel:
    """A next hop whose RCPT never answers."""

    def check_recipient(self, envelope, address, options):
        from twisted.internet.defer import Deferred

        return Deferred()

    def handle_message(self, envelope):
        pass


# -- the pool and the server's hook deadline (--handler-timeout) -------------------
class PooledStandIn:
    """What the pool sees of a downstream connection."""

    def __init__(self) -> None:
        self.idle = True
        self.reused = 0
        self.discarded = False
        self.on_lost = None

    def abort(self) -> None:
        self.idle = False

    def quit(self) -> None:
        self.idle = False


def one_slot_pool():
    from twisted.internet.task import Clock

    from twisted_smtpd.deliver._proxy import ConnectionPool

    connecting: list[Deferred] = []

    def connect():
        connecting.append(Deferred())
        return connecting[-1]

    return ConnectionPool("next", connect, Clock(), size=1, timeout=30), connecting


def test_a_cancelled_waiter_takes_no_connection():
    """A borrower waiting for the pool is cancelled (its hook's deadline):
    the connection given back next goes to the pool, not to it."""
    from twisted.internet.defer import CancelledError

    pool, connecting = one_slot_pool()
    first = pool.acquire()
    connection = PooledStandIn()
    connecting[0].callback(connection)
    assert connection is first.result
    waiter = pool.acquire()
    waiter.cancel()
    assert waiter.result.check(CancelledError)
    waiter.addErrback(lambda _: None)
    pool.release(connection)
    assert 1 == pool.idle_count and 1 == pool.open
    assert connection is pool.acquire().result


def test_a_waiter_cancelled_while_its_connection_is_made():
    """A waiter given a new connection (the old one was dropped) is
    cancelled before it is ready: the connection, once ready, goes to the
    pool; if it fails instead, the slot is free."""
    from twisted.internet.defer import CancelledError

    pool, connecting = one_slot_pool()
    pool.acquire()
    dropped = PooledStandIn()
    connecting[0].callback(dropped)
    waiter = pool.acquire()
    pool.discard(dropped)  # a new connection is made for the waiter
    assert 2 == len(connecting)
    waiter.cancel()
    assert waiter.result.check(CancelledError)
    waiter.addErrback(lambda _: None)
    ready = PooledStandIn()
    connecting[1].callback(ready)
    assert 1 == pool.idle_count and 1 == pool.open
    assert ready is pool.acquire().result

    pool, connecting = one_slot_pool()
    pool.acquire()
    connecting[0].callback(dropped := PooledStandIn())
    waiter = pool.acquire()
    pool.discard(dropped)
    waiter.cancel()
    waiter.addErrback(lambda _: None)
    connecting[1].errback(RuntimeError("refused"))
    assert 0 == pool.open and 0 == pool.idle_count
    pool.acquire()
    assert 3 == len(connecting)  # the slot is free for a new connection
    connecting[2].callback(PooledStandIn())


class NextHopSlowFor(MemoryHandler):
    """A next hop whose MAIL never answers for senders named slow..."""

    def check_sender(self, envelope):
        return Deferred() if envelope.mail_from.startswith("slow") else None


def mail_reply(port, sender):
    """Connect, EHLO, MAIL FROM:<sender>: the reply line; then QUIT."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"EHLO c\r\n")
        while reader.readline()[3:4] != b" ":
            pass
        sock.sendall(b"MAIL FROM:<%s>\r\n" % sender)
        reply = reader.readline()
        sock.sendall(b"QUIT\r\n")
        reader.readline()
        return reply


@pytest_twisted.inlineCallbacks
def test_handler_deadline_while_the_next_hop_answers_mail_frees_the_slot(listen, relay):
    """--handler-timeout passes while the next hop answers MAIL: 451, the
    connection dropped, and its pool slot free for the next client."""
    handler = relay(listen(NextHopSlowFor()), pool_size=1, timeout=5)
    port = listen(handler, limits=Limits(handler_timeout=0.3))
    first = yield in_thread(mail_reply, port, b"slow@example.org")
    assert first.startswith(b"451 4.3.0"), first
    assert 0 == handler.pool.open
    second = yield in_thread(mail_reply, port, b"s@example.org")
    assert second.startswith(b"250"), second


@pytest_twisted.inlineCallbacks
def test_handler_deadline_while_waiting_for_the_pool_loses_no_connection(listen, relay):
    """A client whose MAIL waits for the one pooled connection past
    --handler-timeout gets 451; the connection, given back, serves the
    next client (it went to the cancelled waiter before)."""
    import threading

    handler = relay(listen(MemoryHandler()), pool_size=1, timeout=5)
    released = telling(handler, 2)
    port = listen(handler, limits=Limits(handler_timeout=0.3))
    holding, done = threading.Event(), threading.Event()

    def hold_the_connection():
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(b"EHLO c\r\n")
            while reader.readline()[3:4] != b" ":
                pass
            sock.sendall(b"MAIL FROM:<s@example.org>\r\n")
            assert reader.readline().startswith(b"250")
            holding.set()
            done.wait(15)
            sock.sendall(b"RSET\r\nQUIT\r\n")
            reader.readline()
            reader.readline()

    holder = in_thread(hold_the_connection)
    yield in_thread(holding.wait, 15)
    waited = yield in_thread(mail_reply, port, b"w@example.org")
    assert waited.startswith(b"451 4.3.0"), waited
    done.set()
    yield holder
    yield released[0]  # reset and back in the pool
    assert 1 == handler.pool.idle_count and 1 == handler.pool.open
    third = yield in_thread(mail_reply, port, b"t@example.org")
    assert third.startswith(b"250"), third
    yield released[1]
    assert 1 == handler.pool.idle_count and 1 == handler.pool.open
