# -*- test-case-name: tests.test_protocol -*-
"""
The wire: a L{LineReceiver} that drives the pure L{Session} and talks to the
handler.

Received bytes go to exactly one input mode at a time (L{twisted_smtpd._input}):
command lines, SASL answers, a DATA body, a BDAT chunk, or raw bytes for a
subclass.  Lines are split on CRLF only (never on a bare CR or LF).  While a
handler hook is pending, input is held, so pipelined commands are answered
strictly in order, and the hook's reply leaves in one write with the replies
to the commands held behind it.

The LineReceiver contract holds for subclasses: C{lineReceived},
C{MAX_LENGTH}/C{lineLengthExceeded}, C{setRawMode}/C{rawDataReceived},
C{setLineMode(extra)}, C{clearLineBuffer}, C{sendLine} (in order with the
replies), C{pauseProducing}/C{resumeProducing}, and a verb table per class
(C{do_X} methods).
"""

from __future__ import annotations

from types import CoroutineType
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHandshakeListener,
    IPushProducer,
    ISSLTransport,
)
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from ._bdat import ChunkedMessage, bdat_argument, drop_chunk
from ._commands import parse_helo, parse_mail, parse_rcpt, split_command
from ._data import DataReader
from ._delivery import HandlerHooks, Message
from ._fastwrite import (
    CLOSE_GRACE,
    can_write_directly,
    close_soon,
    send_now,
    write_now,
    write_soon,
)
from ._hooks import HandlerTimedOut, deadline_over, failure_reply, tell_abandoned
from ._hooks import abort_receiver as _abort_receiver
from ._input import DROP, DataMode, LineMode, RawMode
from ._peer import address_text, forward_client, peer_host, xclient_update
from ._session import Envelope, Session, TLSInfo, received_header
from ._tlswatch import TLSWatch, current_tls
from .auth import AuthExchange
from .fastlog import emit_summary
from .replies import (
    R214_HELP,
    R220_STARTTLS,
    R221_BYE,
    R250_OK,
    R250_RECIPIENT_OK,
    R250_RESET,
    R250_SENDER_OK,
    R252_CANNOT_VRFY,
    R354_START_INPUT,
    R421_HANDLER_TIMEOUT,
    R421_SESSION_TOO_LONG,
    R421_SHUTTING_DOWN,
    R421_TIMEOUT,
    R451_LOCAL_ERROR,
    R500_LINE_TOO_LONG,
    R500_UNKNOWN_COMMAND,
    R500_USE_LHLO,
    R501_NO_ARGUMENTS,
    R501_SYNTAX_VRFY,
    R502_NOT_IMPLEMENTED,
    R503_ALREADY_TLS,
    Reply,
    SMTPError,
    fill,
    queued_reply,
    queued_wire,
)

if TYPE_CHECKING:
    from .factory import SMTPFactory
    from .rdns import ClientName

# HandlerHooks and received_header lived here; re-exported for one release.
__all__ = [
    "SMTPServerProtocol",
    "LMTPServerProtocol",
    "HandlerHooks",
    "received_header",
]

# A module logger: a Logger class attribute builds a new Logger on every access.
_log = Logger(namespace="twisted_smtpd.protocol")
#: rdns.name_client, imported on first use (importing per connection costs ~0.7 us)
_name_client: Optional[Callable[..., Any]] = None

#: replies that count against the bad-command budget
_BAD_COMMAND_CODES = frozenset({500, 501, 502, 503, 504, 530, 555})
#: pause reading from the socket when this much input waits behind a hook
_MAX_HELD_INPUT = 256 * 1024
#: replies collected in one read before they are written (so that a client
#: that does not read meets the transport's back-pressure within one read)
_MAX_BATCH = 64
#: seconds a closing connection gets to take its last reply; then it is aborted

# Why input is not dispatched now: bits of SMTPServerProtocol._waits.
_HOOK = 1  # a hook's answer, or the AUTH failure delay, is pending
_PAUSED = 2  # pauseProducing() was called (also a reason in _pauses)
_RESTART = 4  # the buffer was replaced mid-read (clearLineBuffer, setLineMode)
_CLOSED = 8  # the connection is closing or gone
# Why the transport is paused: bits of SMTPServerProtocol._pauses.
_OVERFLOW = 16  # more than _MAX_HELD_INPUT waits behind a pending hook
_RECEIVER = 32  # the streaming receiver asked for back-pressure
_OUTPUT_FULL = 64  # (a wait) the transport's write buffer is full: see _output_full

# The lifecycle (SMTPServerProtocol._phase).
_OPEN = "open"
_DRAINING = "draining"  # shutting down once the work in flight is answered
_CLOSED_PHASE = "closed"


@implementer(IPushProducer)
class _OutputWatch:
    """Registered on the transport: it tells when the unsent output is over
    the transport's buffer size (and when it drained), like any producer."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: _Wire) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:
        self._protocol._output_full(True)

    def resumeProducing(self) -> None:
        self._protocol._output_full(False)

    def stopProducing(self) -> None:
        pass


@implementer(IHandshakeListener)
class _Wire(LineReceiver, TimeoutMixin):
    """The LineReceiver glue under L{SMTPServerProtocol}, with no SMTP in it.

    The read loop over one input mode, the transport's pause (one owner, a
    set of reasons), replies out in one write per read, waiting on hooks
    with input held, and the lifecycle.  This is the contract subclasses
    inherit: C{lineReceived}, C{MAX_LENGTH}/C{lineLengthExceeded},
    C{setRawMode}/C{rawDataReceived}, C{setLineMode(extra)},
    C{clearLineBuffer}, C{sendLine} (in order with the replies) and
    C{pauseProducing}/C{resumeProducing}.

    @ivar _mode: the input mode: where the next received bytes go.
    @ivar _buffer: received bytes; those not consumed yet start at C{_pos}.
    @ivar _waits: why input is not dispatched now (C{_HOOK}, C{_PAUSED}...).
    @ivar _pauses: why the transport is paused; only L{_set_pauses} changes it.
    @ivar _phase: open, draining (421 once the work in flight ends), closed.
    @ivar _pending: the hook's Deferred, or the AUTH delay, being waited for.
    """

    delimiter = b"\r\n"
    #: the longest line (CRLF not counted); 0: the longest L{Limits} allow
    MAX_LENGTH = 0
    transport: Any  # TCP, TLS or test transports: what they all provide
    session: Session
    # Class defaults: an idle session stores only what differs.
    _out: Optional[list[bytes]] = None  # replies collected during a read
    _pending: Any = None
    _deadline: Optional[float] = None  # a partial line or a body must end by then
    _how = "lost"  # how the session ended, for events
    _output_watch: Optional[_OutputWatch] = None  # registered on the transport
    _tls: Optional[TLSWatch] = None  # on a connection that uses TLS
    _abort_call: Any = None  # closing: abort if the last reply is not taken
    _drain_reply: Optional[Reply] = None  # the 421 to close with once not busy
    _drain_how = "shutdown"

    def __init__(self, factory: SMTPFactory) -> None:
        self.factory = factory
        self.limits = factory.limits
        self._events = factory.events
        self._debug = factory.debug
        # Instance attributes, not class defaults: read on every read, and on
        # 3.11 a class default reads at about twice the cost of an instance
        # attribute and keeps its instructions from specializing.
        self._buffer = b""
        self._pos = 0
        self._waits = 0
        self._pauses = 0
        self._phase = _OPEN
        self._busy = False  # inside a read: new bytes are appended, not read
        self._direct_write = False  # replies may go straight to the socket
        if not self.MAX_LENGTH:
            self.MAX_LENGTH = self.limits.max_line
        cls = type(self)
        self._lines = LineMode(
            self, cls.lineReceived, cls.lineLengthExceeded, self.MAX_LENGTH
        )
        self._mode: Any = self._lines

    @property
    def busy(self) -> bool:
        """Closing now would lose work (subclasses add theirs)."""
        return self._mode.busy or self._pending is not None

    # -- Twisted plumbing ------------------------------------------------------
    def callLater(  # type: ignore[override]
        self, delay: float, fn: Callable[..., Any], *a: Any, **kw: Any
    ) -> Any:
        """TimeoutMixin's clock: the factory's reactor, so tests can use a Clock.

        (Kept for subclasses; the idle timer itself is on the factory's
        L{IdleTimers <twisted_smtpd._deadlines.IdleTimers>}, on its reactor.)
        """
        return self.factory.reactor.callLater(delay, fn, *a, **kw)

    # -- the idle timer: TimeoutMixin's API, on the factory's IdleTimers ------
    # No DelayedCall per connection: the factory's IdleTimers holds one heap
    # entry per armed session and one timer for them all.  A read only
    # stores when it came (_idle_since); when the entry comes due before the
    # timeout, it is armed again for the rest, so the timeout still comes
    # exactly timeOut seconds after the last input.
    _idle_entry: Optional[list[Any]] = None  # in the factory's IdleTimers
    _idle_since = 0.0  # the last input (or setTimeout), on the factory's clock

    def setTimeout(self, period: Optional[float]) -> Optional[float]:
        """Time out C{period} seconds from now (L{None}: never), as TimeoutMixin."""
        prev = self.timeOut
        self.timeOut = period  # type: ignore[assignment]
        entry = self._idle_entry
        if period is None:
            if entry is not None:
                self._idle_entry = None
                self.factory.idle_timers.disarm(entry)
            return prev
        now = self.factory.reactor.seconds()
        self._idle_since = now
        if entry is not None:
            if entry[0] <= now + period:
                return prev  # due no later than the new deadline: re-armed then
            self.factory.idle_timers.disarm(entry)
        self._idle_entry = self.factory.idle_timers.arm(self, now + period)
        return prev

    def resetTimeout(self) -> None:
        """Restart the countdown (no-op once timed out or with no timeout)."""
        if self._idle_entry is not None and self.timeOut is not None:
            self._idle_since = self.factory.reactor.seconds()

    def _idle_due(self) -> None:
        """The factory's IdleTimers: this session's entry is due."""
        entry = self._idle_entry
        if entry is not None and entry[2] is not None:
            # Stale: another session's timeout, run in the same batch, re-armed
            # this one meanwhile; its live entry stands.
            return
        self._idle_entry = None
        if self.timeOut is None:
            return
        deadline = self._idle_since + self.timeOut
        if self.factory.reactor.seconds() < deadline:  # input came since
            self._idle_entry = self.factory.idle_timers.arm(self, deadline)
            return
        self.timeoutConnection()

    def connectionMade(self) -> None:
        self._direct_write = can_write_directly(self.transport)
        if not self._direct_write:
            self._watch_output()
        # (else registered by _fastwrite once Twisted's writer is to hold
        # bytes: only its write() pauses a producer, so the watch sees the
        # same pauses, and most connections never need it: ~0.6 us each)
        if getattr(self.transport, "awaiting_proxy_header", False):
            # Behind a PROXY-protocol listener: greet once the real peer is known.
            self.setTimeout(self.limits.line_timeout)
            return
        self._start_session()

    def _watch_output(self) -> None:
        """Register the output watch on the transport (once, while open)."""
        if self._output_watch is not None or self._phase is _CLOSED_PHASE:
            return
        register = getattr(self.transport, "registerProducer", None)
        if register is not None and getattr(self.transport, "producer", None) is None:
            self._output_watch = _OutputWatch(self)
            register(self._output_watch, True)

    def proxyHeaderReceived(self) -> None:
        """The PROXY header is in: C{transport.getPeer()} is the real client."""
        if self.session is None:
            self._start_session()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._idle_entry is not None:
            self.setTimeout(None)
        if self._output_watch is not None:
            self._output_watch = None  # the transport dropped it already
        if self._phase is not _CLOSED_PHASE:
            self._set_phase_closed()
        call = self._abort_call
        if call is not None:
            if call.active():
                call.cancel()
            self._abort_call = None
        # The modes hold the protocol: let it go by reference counting.
        self._mode = self._lines = DROP  # type: ignore[assignment]
        pending = self._pending
        if pending is not None and not isinstance(pending, Deferred):
            # The AUTH failure delay: nobody is left to hear the 535.
            if pending.active():
                pending.cancel()
            self._pending = None
        if self._tls is not None:
            self._tls.lost(reason)

    def _start_session(self) -> None:
        raise NotImplementedError()

    # -- input -----------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self.session is None:  # bytes right behind a PROXY header
            self._start_session()
        deadline = self._deadline
        if deadline is not None:  # a body or a partial line
            # One clock read for its deadline and the idle time (the idle
            # timer runs on the factory's reactor too: see IdleTimers).
            now = self.factory.reactor.seconds()
            if now > deadline:
                self._too_slow()
                return
            if data and self._idle_entry is not None:
                self._idle_since = now  # resetTimeout, inline
        elif data and self._idle_entry is not None:
            self._idle_since = self.factory.reactor.seconds()  # resetTimeout
        if self._waits or self._busy:
            if not self._waits & _CLOSED:
                self._buffer += data  # appending keeps _pos valid
                if len(self._buffer) - self._pos > _MAX_HELD_INPUT:
                    self._set_pauses(self._pauses | _OVERFLOW)
            return
        self._buffer = self._buffer + data if self._buffer else data
        self._read()

    def _read(self) -> None:
        """Consume the buffer in the current mode until it is used up or must wait.

        Replies made meanwhile leave in one write at the end.
        """
        out = self._out
        batch = out is None
        if batch:
            out = self._out = []
        self._busy = True
        try:
            buffer, pos = self._buffer, self._pos
            size = len(buffer)
            while pos < size:
                mode = self._mode
                taken = mode.consume(buffer, pos)
                if self._waits or self._buffer is not buffer:
                    if self._waits & _RESTART:  # the buffer was replaced
                        self._waits &= ~_RESTART
                        buffer, pos = self._buffer, self._pos
                    else:  # bytes appended meanwhile, or input must wait
                        buffer, pos = self._buffer, taken
                    size = len(buffer)
                    if self._waits:
                        break
                elif taken == pos and self._mode is mode:
                    break  # the mode needs more bytes
                else:
                    pos = taken
            if not self._waits & _CLOSED:
                rest = self._buffer = buffer[pos:] if pos < size else b""
                self._pos = 0
                if not self._mode.busy:
                    # A partial command line must be done by line_timeout.
                    if not rest or self._waits:
                        if self._deadline is not None:
                            self._deadline = None
                    elif self._deadline is None:
                        self._deadline = (
                            self.factory.reactor.seconds() + self.limits.line_timeout
                        )
        finally:
            self._busy = False
            if batch:
                if out:
                    data = out[0] if len(out) == 1 else b"".join(out)
                    if self._direct_write:  # (_send, inline: once per read)
                        write_soon(self.transport, data)
                    else:
                        self.transport.write(data)
                self._out = None
        if self._phase is _DRAINING:
            self._close_if_draining()

    def _set_mode(self, mode: Any, deadline: Optional[float] = None) -> None:
        """Send the next bytes to C{mode}, to be done within C{deadline} seconds."""
        self._mode = mode
        self._deadline = (
            None if deadline is None else self.factory.reactor.seconds() + deadline
        )

    def _too_slow(self) -> None:
        """The line or body deadline passed (checked as bytes arrive: silence
        is the idle timer's job, not this)."""
        self._deadline = None
        _log.info(
            "smtpd session {session_id}: too slow, closing",
            session_id=self.session.session_id,
        )
        self.close_with(fill(R421_TIMEOUT, hostname=self.factory.hostname), "timeout")

    def _set_pauses(self, pauses: int) -> None:
        """The one place the transport is paused or resumed, from its reasons."""
        before, self._pauses = self._pauses, pauses
        if self._phase is _CLOSED_PHASE:
            return
        if pauses and not before:
            self.transport.pauseProducing()
        elif before and not pauses:
            self.transport.resumeProducing()

    def setRawMode(self) -> None:
        """Send what follows to C{rawDataReceived} until L{setLineMode}."""
        self._set_mode(RawMode(self, self.rawDataReceived))

    def setLineMode(self, extra: bytes = b"") -> None:
        """Back to lines; C{extra} (bytes past the raw part) is read first."""
        self._set_mode(self._lines)
        if extra:
            self._replace_buffer(extra + self._buffer[self._pos :])

    def clearLineBuffer(self) -> bytes:
        """Drop the bytes not read yet (STARTTLS uses it) and return them."""
        rest = self._buffer[self._pos :]
        self._replace_buffer(b"")
        return rest

    def _replace_buffer(self, data: bytes) -> None:
        self._buffer, self._pos = data, 0
        if self._busy:
            self._waits |= _RESTART  # the read in progress starts over
        elif data and not self._waits:
            self._read()

    def pauseProducing(self) -> None:
        """Stop reading, lines already received included, until resumed."""
        self._waits |= _PAUSED
        self._set_pauses(self._pauses | _PAUSED)

    def resumeProducing(self) -> None:
        self._waits &= ~_PAUSED
        self._set_pauses(self._pauses & ~_PAUSED)
        if not self._busy and not self._waits and self._buffer:
            self._read()

    def stopProducing(self) -> None:
        self._waits |= _PAUSED
        self.transport.stopProducing()

    def _output_full(self, full: bool) -> None:
        """The transport's write buffer went over its size, or drained.

        While it is full, no input is answered: a client that never reads its
        replies can't make them pile up.  Input that arrives meanwhile is held
        like input behind a hook, and past C{_MAX_HELD_INPUT} the transport is
        paused (C{_OVERFLOW}).  Not at once: a TLS transport must go on
        reading to finish its handshake, before which all output is held.
        The idle timer keeps running (no bytes arrive to restart it).
        """
        if full:
            self._waits |= _OUTPUT_FULL
            return
        self._waits &= ~_OUTPUT_FULL
        if self._pauses & _OVERFLOW and not self._waits & _HOOK:
            self._set_pauses(self._pauses & ~_OVERFLOW)
        if not self._busy and not self._waits and self._buffer:
            self._read()

    def sendLine(self, line: bytes) -> None:
        """Send a line, in order with the replies already made."""
        self._reply_bytes(line + self.delimiter)

    # The receiver's wishes, through its revocable ReceiverProducer.
    def receiver_paused(self, paused: bool) -> None:
        pauses = self._pauses
        self._set_pauses(pauses | _RECEIVER if paused else pauses & ~_RECEIVER)

    def receiver_stopped(self) -> None:
        self._close()

    # -- output ----------------------------------------------------------------
    def reply(self, reply: Reply) -> None:
        """Send one reply (enhanced status codes only after EHLO)."""
        if self._phase is _CLOSED_PHASE:
            return
        if self._events is not None:
            self._events.reply_sent(reply.code)
        session = self.session
        if session is not None and session.esmtp:
            data = reply.__dict__.get("_wire_enhanced") or reply.encoded(True)
        else:
            data = reply.__dict__.get("_wire") or reply.encoded(False)
        out = self._out
        if out is None or self._debug:
            self._reply_bytes(data)
            return
        # What _reply_bytes does without --debug, one call less per reply.
        out.append(data)
        if len(out) >= _MAX_BATCH:
            self._flush()

    def _reply_queued(self, queue_id: str) -> None:
        """C{reply(queued_reply(queue_id))}: the 250 after a stored message.

        Once per message, so the wire bytes are made directly, without the
        L{Reply} and its two encodings (a subclass's own C{reply} still
        gets the L{Reply}).
        """
        if self._phase is _CLOSED_PHASE:
            return
        out = self._out
        if out is None or self._debug or type(self).reply is not _Wire.reply:
            self.reply(queued_reply(queue_id))
            return
        if self._events is not None:
            self._events.reply_sent(250)
        session = self.session
        out.append(queued_wire(queue_id, session is not None and session.esmtp))
        if len(out) >= _MAX_BATCH:
            self._flush()

    def _reply_bytes(self, data: bytes) -> None:
        """Send encoded reply lines, logging them with --debug."""
        if self._debug:
            _log.info(
                "smtpd {session_id} >>> {line}",
                session_id=self.session.session_id if self.session else "-",
                line=data.rstrip(b"\r\n"),
            )
        out = self._out
        if out is None:
            self._send(data)
        else:
            out.append(data)
            if len(out) >= _MAX_BATCH:
                self._flush()  # may report the transport full: the read stops

    def _flush(self) -> None:
        """Send the replies collected so far (before the transport changes state)."""
        out = self._out
        if out:
            self._send(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _send(self, data: bytes) -> None:
        if self._direct_write:
            write_soon(self.transport, data)  # sent at the end of the turn
        else:
            self.transport.write(data)

    def close_with(self, reply: Reply, how: str = "closed") -> None:
        """Send C{reply} (a 421) and close."""
        self.reply(reply)
        self._close(how)

    def _close(self, how: str = "closed") -> None:
        if self._phase is _CLOSED_PHASE:
            return
        self._set_phase_closed()
        self._how = how
        self.setTimeout(None)
        transport = self.transport
        if self._direct_write:
            # Sent now, to know whether the kernel took it.
            out = self._out
            if out:
                write_now(transport, out[0] if len(out) == 1 else b"".join(out))
                out.clear()
            else:
                send_now(transport)
            if not (transport.dataBuffer or transport._tempDataLen):
                close_soon(transport)  # nothing unsent: it closes by itself
                return
        else:
            self._flush()
        # A client that does not read would keep the connection open for
        # good (the last reply never flushed): it gets CLOSE_GRACE seconds.
        transport.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.factory.reactor.callLater(
                CLOSE_GRACE, self._abort_unflushed
            )

    def _abort_unflushed(self) -> None:
        self._abort_call = None
        if self.session is not None:
            _log.info(
                "smtpd session {session_id}: last reply not taken, aborting",
                session_id=self.session.session_id,
            )
        self.transport.abortConnection()

    def _set_phase_closed(self) -> None:
        self._phase = _CLOSED_PHASE
        self._waits |= _CLOSED
        if self._tls is not None:
            self._tls.cancel()  # closing anyway: the handshake does not matter
        if self._output_watch is not None:
            # A registered producer keeps a closing TCP transport open.
            self._output_watch = None
            self.transport.unregisterProducer()

    def shutdown(self) -> None:
        """Server going down: 421 now, or once the message in flight is answered."""
        if self._phase is not _OPEN:
            return
        self._drain(
            fill(R421_SHUTTING_DOWN, hostname=self.factory.hostname), "shutdown"
        )

    def _drain(self, reply: Reply, how: str) -> None:
        """Close with C{reply} now, or once the work in flight is answered."""
        self._phase = _DRAINING
        self._drain_reply = reply
        self._drain_how = how
        self._close_if_draining()

    def force_close(self) -> None:
        """Grace period over: 421 and drop the connection, whatever it is doing."""
        if self._phase is not _CLOSED_PHASE:
            self.reply(fill(R421_SHUTTING_DOWN, hostname=self.factory.hostname))
            self._how = "shutdown"
        self._set_phase_closed()
        self._flush()
        if self._direct_write:
            send_now(self.transport)  # the abort would drop it
        self.transport.abortConnection()

    def _close_if_draining(self) -> None:
        if self._phase is _DRAINING and not self.busy:
            reply = self._drain_reply
            assert reply is not None
            self.close_with(reply, self._drain_how)

    def _session_expired(self) -> None:
        """C{max_session_time} is up: no loop of commands may hold a slot.

        Called by the factory's L{Deadlines}, at most C{GRANULARITY} late.
        """
        if self._phase is not _OPEN:
            return
        _log.info(
            "smtpd session {session_id}: session time limit reached",
            session_id=self.session.session_id,
        )
        self._drain(
            fill(R421_SESSION_TOO_LONG, hostname=self.factory.hostname), "timeout"
        )

    # -- TLS: its handshake's deadline and its facts ---------------------------
    def _expect_handshake(self) -> None:
        """A handshake begins (STARTTLS, or at connect on an C{ssl:} listener)."""
        if self._tls is None:
            self._tls = TLSWatch(self.transport, self.session, self._events)
        timeout = self.limits.tls_handshake_timeout
        self._tls.expect(self.factory.reactor, timeout, self._handshake_timed_out)

    def _handshake_timed_out(self) -> None:
        # No reply can reach a client that has not finished the handshake.
        self._set_phase_closed()
        self._how = "timeout"
        self.setTimeout(None)
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        """TLS is up (STARTTLS or an C{ssl:} endpoint): record its facts."""
        if self._tls is not None:
            self._tls.completed()
        elif self._events is not None:  # before the session (behind PROXY)
            self._events.tls_handshake(True)

    def timeoutConnection(self) -> None:
        if self.session is None:  # no PROXY header in time
            self._close()
            return
        _log.info(
            "smtpd session {session_id} idle timeout",
            session_id=self.session.session_id,
        )
        self.close_with(fill(R421_TIMEOUT, hostname=self.factory.hostname), "timeout")

    # -- waiting for hooks -----------------------------------------------------
    def _run(
        self,
        name: str,
        hook: Optional[Callable[..., Any]],
        args: tuple[Any, ...],
        succeeded: Callable[..., None],
        failed: Optional[Callable[..., None]] = None,
        context: tuple[Any, ...] = (),
    ) -> None:
        """Call the hook C{name}, then C{succeeded(result, *context)}.

        On failure the error's reply is sent, then C{failed(failure,
        *context)} runs.  A synchronous hook is answered at once; a Deferred
        or coroutine holds later commands until it fires.
        """
        if hook is None:
            succeeded(None, *context)
            return
        started = self.factory.reactor.seconds() if self._events is not None else 0.0
        try:
            result = hook(*args)
            if isinstance(result, CoroutineType):
                result = Deferred.fromCoroutine(result)
        except Exception:
            self._hook_failed(Failure(), name, started, failed, context)
            return
        # (None first: Deferred is an ABC, its isinstance is the slow kind.)
        if result is None or not isinstance(result, Deferred):
            if self._events is None:
                succeeded(result, *context)
            else:
                self._hook_ok(result, name, started, succeeded, context)
            return
        self._hold(result)
        timeout = self.limits.handler_timeout
        if timeout:
            deadline = self.factory.reactor.callLater(timeout, result.cancel)
            result.addBoth(deadline_over, deadline, name, timeout)
        result.addCallbacks(
            self._complete,
            self._complete,
            (self._hook_ok, name, started, succeeded, context),
            errbackArgs=(self._hook_failed, name, started, failed, context),
        )
        result.addErrback(self._unexpected)

    def _hook_raised(
        self, name: str, failed: Optional[Callable[..., None]] = None
    ) -> None:
        """Inside an C{except}: the hook C{name}, called by its caller, raised
        (answered as L{_run} answers it, without hook timing)."""
        self._hook_failed(Failure(), name, 0.0, failed, ())

    def _hold(self, pending: Any) -> None:
        """Dispatch nothing more until C{pending} completes: keeps replies in order.

        The idle timer stops meanwhile: the wait is the server's, and a 421
        while a handler stores the message would make the client send it again.
        """
        self._pending = pending
        self._waits |= _HOOK
        if self.timeOut is not None:
            self.setTimeout(None)

    def _complete(self, result: Any, then: Callable[..., None], *args: Any) -> None:
        """The wait is over: C{then(result, *args)}, then the held input; one write."""
        self._pending = None
        self._waits &= ~_HOOK
        if self._phase is not _CLOSED_PHASE:
            self.setTimeout(self.limits.timeout)
        batch = self._out is None
        if batch:
            self._out = []
        try:
            then(result, *args)
            if self._phase is _CLOSED_PHASE:
                self._answered_after_close()
            if self._pauses & _OVERFLOW:
                self._set_pauses(self._pauses & ~_OVERFLOW)
            if self._phase is _DRAINING:
                self._close_if_draining()
            if not self._busy and not self._waits and self._buffer:
                self._read()
        finally:
            if batch:
                self._flush()
                self._out = None

    def _answered_after_close(self) -> None:
        """The wait held at the close is over (subclasses end what it held)."""

    def _hook_ok(
        self,
        result: Any,
        name: str,
        started: float,
        then: Callable[..., None],
        context: tuple[Any, ...],
    ) -> None:
        if self._events is not None:
            elapsed = self.factory.reactor.seconds() - started
            self._events.hook_finished(name, elapsed, True)
        then(result, *context)

    def _hook_failed(
        self,
        failure: Failure,
        name: str,
        started: float,
        then: Optional[Callable[..., None]],
        context: tuple[Any, ...],
    ) -> None:
        if self._events is not None:
            elapsed = self.factory.reactor.seconds() - started
            self._events.hook_finished(name, elapsed, False)
        self._answer_failure(name, failure)
        if then is not None:
            then(failure, *context)

    def _answer_failure(self, name: str, failure: Failure) -> None:
        """The reply to a failed hook (subclasses answer some differently)."""
        self.reply(self.failure_reply(failure))

    def _reply_failure(self, failure: Failure) -> None:
        self.reply(self.failure_reply(failure))

    def failure_reply(self, failure: Failure) -> Reply:
        """The handler's SMTPError reply, or 451 with the failure logged.

        The handler's reply is made safe for the wire first (no CR, LF
        smuggling, bounded lines, a refusal code): see L{safe_reply}.
        """
        return failure_reply(failure, self.session.session_id)

    def _unexpected(self, failure: Failure) -> None:
        _log.failure("smtpd internal error", failure)
        self.reply(R451_LOCAL_ERROR)


class SMTPServerProtocol(_Wire):
    """One SMTP session.  Built by L{SMTPFactory}; holds no policy of its own.

    Subclass it (and set C{SMTPFactory.protocol}) to add or replace verbs:
    each C{do_VERB(argument)} method is a verb, found in a table built per
    class.

    @ivar _message: the message between C{open_message} and its end of data.
    """

    _COMMANDS: dict[str, Callable[..., None]] = {}
    #: LMTP (RFC 2033): one reply per recipient after the data
    lmtp = False
    _message: Optional[Message] = None
    _started: Optional[float] = None  # greeting time, when events are observed
    _name: Optional[ClientName] = None  # the client's name, by reverse DNS
    _built_peer: Any = None  # the address the factory's buildProtocol got

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._COMMANDS = _verb_table(cls)

    session = None  # type: ignore[assignment]  # until _start_session

    def __init__(self, factory: SMTPFactory) -> None:
        super().__init__(factory)
        self._hooks: HandlerHooks = factory.hooks

    @property
    def busy(self) -> bool:
        """Reading a message, or waiting for a handler: closing now loses work."""
        return self._mode.busy or self._message is not None or self._pending is not None

    def _start_session(self) -> None:
        transport = self.transport
        peer = self._built_peer
        if (
            type(transport) is not tcp.Server
            or type(peer) is not IPv4Address
            or peer.type != "TCP"
            or transport.client != (peer.host, peer.port)
        ):
            peer = transport.getPeer()
        # (else: the address buildProtocol got equals what getPeer() would
        # build from transport.client again, once per connection)
        tls = current_tls(transport) if ISSLTransport.providedBy(transport) else None
        factory = self.factory
        self.session = Session(
            factory.new_session_id(),
            peer,
            self.limits,
            tls_info=tls,
            tls_required=factory.tls_required,
            auth_required=factory.auth_required,
            lmtp=self.lmtp,
        )
        if self._debug:
            _log.info(
                "smtpd session {session_id} connected from {peer}",
                session_id=self.session.session_id,
                peer=address_text(peer),
            )
        refusal = factory.admit(self)
        if refusal is not None:
            self.close_with(refusal)
            return
        host = peer_host(peer)
        if factory.xclient_hosts and host in factory.xclient_hosts:
            self.session.xclient_allowed = True
        if factory.reverse_dns is not None:
            self._look_up_name(host)
        self.setTimeout(self.limits.timeout)
        if tls is not None:  # an ssl: listener: the handshake began at connect
            self._expect_handshake()
        # The greeting waits for the handler's verdict on the client (and any
        # early talker's bytes wait with it).
        check_client = self._hooks.check_client
        if check_client is None:
            self._greet(None)  # what _run does with no hook, one call less
            return
        self._run("check_client", check_client, (peer,), self._greet, self._shun)

    def _answer_failure(self, name: str, failure: Failure) -> None:
        if name == "check_client" and failure.check(HandlerTimedOut):
            self.failure_reply(failure)  # the log line
            self.reply(fill(R421_HANDLER_TIMEOUT, hostname=self.factory.hostname))
        else:
            self.reply(self.failure_reply(failure))

    # -- the client's name: looked up at connect, awaited when a message starts
    def _look_up_name(self, host: Optional[str]) -> None:
        rdns = self.factory.reverse_dns
        if rdns is not None and host is not None:
            global _name_client
            if _name_client is None:  # imported on first use: twisted.names
                from .rdns import name_client

                _name_client = name_client
            self._name = _name_client(rdns, self.session, host, self._name)

    def _run_again(self, _: Any, method: Callable[..., None], argument: str) -> None:
        """C{method(argument)} again, after a wait that held input (the name)."""
        if self._phase is _CLOSED_PHASE:
            return
        try:
            method(self, argument)
        except SMTPError as error:
            self._reply_bad(error.reply)

    def _greet(self, _: Any) -> None:
        greeting = self.factory.greeting
        if (
            self._out is None
            and self._events is None
            and not self._debug
            and type(self).reply is _Wire.reply
        ):
            # What reply() does here (no events, no --debug, not ESMTP yet, no
            # subclass's reply() to see it), once per connection.
            if self._phase is not _CLOSED_PHASE:
                self._send(greeting.__dict__.get("_wire") or greeting.encoded(False))
            return
        self.reply(greeting)
        if self._events is not None:
            self._started = self.factory.reactor.seconds()
            self._events.session_started()

    def _shun(self, _: Failure) -> None:
        if self._events is not None:
            self._events.connection_refused("check_client")
        self._close()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        if self._message is not None:
            self._message.abort()
        elif self._hooks.transaction_abandoned and self._pending is None:
            # (A hook still answering may change the transaction: told then.)
            self._abandon()
        self.factory.release(self)
        session = self.session
        if session is None:
            return
        if self._started is not None and self._events is not None:
            elapsed = self.factory.reactor.seconds() - self._started
            self._events.session_ended(self._how, elapsed)
        # Sessions that sent mail are in the per-message lines already.
        if not self.factory.quiet and (session.messages == 0 or self._debug):
            _log_session_closed(session)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line over C{MAX_LENGTH}: 500 5.5.2 (the rest of it is dropped)."""
        self._reply_bad(R500_LINE_TOO_LONG)

    def lineReceived(self, line: bytes) -> None:
        verb, argument = split_command(line)
        if self._debug:
            _log.info(
                "smtpd {session_id} <<< {line}",
                session_id=self.session.session_id,
                line=_mask(line),
            )
        size = len(line) + 2
        if size > self.limits.shortest_line and size > self.limits.line_limit(verb):
            self._reply_bad(R500_LINE_TOO_LONG)
            return
        method = self._COMMANDS.get(verb)
        if method is None:
            self._reply_bad(R500_UNKNOWN_COMMAND)
            return
        refusal = self.session.check(verb)
        if refusal is not None:
            if verb == "BDAT":
                self._refuse_chunk(argument, refusal)
            else:
                self._reply_bad(refusal)
            return
        try:
            method(self, argument)
        except SMTPError as error:
            self._reply_bad(error.reply)

    def _reply_bad(self, reply: Reply) -> None:
        self.reply(reply)
        if reply.code in _BAD_COMMAND_CODES:
            closing = self.session.bad_command()
            if closing is not None:
                self.close_with(fill(closing, hostname=self.factory.hostname))

    # -- commands --------------------------------------------------------------
    def do_HELO(self, argument: str) -> None:
        name = parse_helo(argument)
        self._abort_message()
        self.session.greeted(name, esmtp=False)
        self.reply(self.factory.helo_reply(name))

    def do_EHLO(self, argument: str) -> None:
        name = parse_helo(argument)
        self._abort_message()
        self.session.greeted(name, esmtp=True)
        hello = self.factory.helo_reply(name)
        if type(self).reply is not _Wire.reply:  # a subclass sees every reply
            lines = [hello.text, *self.factory.extensions(self.session)]
            self.reply(Reply(250, "", "\n".join(lines)))
            return
        if self._events is not None:
            self._events.reply_sent(250)
        # Only the first line varies per client; the keywords are cached bytes.
        self._reply_bytes(
            b"250-%s\r\n%s"
            % (
                hello.text.encode("utf-8", "surrogateescape"),
                self.factory.ehlo_keywords(self.session),
            )
        )

    def do_MAIL(self, argument: str) -> None:
        sender, params = parse_mail(argument, self.factory.dsn)
        if self.session.tls is not None:
            self.session.tls = current_tls(self.transport)
        envelope = self.session.begin(sender, params)
        if self._hooks.check_sender is None:
            self._sender_ok(None, envelope)
            return
        self._run(
            "check_sender",
            self._hooks.check_sender,
            (envelope,),
            self._sender_ok,
            context=(envelope,),
        )

    def _sender_ok(self, _: Any, envelope: Envelope) -> None:
        self.session.mail(envelope)
        self.reply(R250_SENDER_OK)

    def do_RCPT(self, argument: str) -> None:
        session = self.session
        envelope = session.envelope
        assert envelope is not None
        smtputf8 = "SMTPUTF8" in envelope.mail_options  # (Envelope.smtputf8)
        address, params = parse_rcpt(argument, smtputf8, self.factory.dsn)
        session.check_recipient_count()
        if self._hooks.check_recipient is None:  # (_recipient_ok, inline)
            session.rcpt(address, params)
            self.reply(R250_RECIPIENT_OK)
            return
        self._run(
            "check_recipient",
            self._hooks.check_recipient,
            (envelope, address, params),
            self._recipient_ok,
            context=(address, params),
        )

    def _recipient_ok(self, _: Any, address: str, params: Any) -> None:
        self.session.rcpt(address, params)
        self.reply(R250_RECIPIENT_OK)

    def do_DATA(self, argument: str) -> None:
        if argument:
            raise SMTPError(fill(R501_NO_ARGUMENTS, verb="DATA"))
        if self._name is not None and self._name.hold(
            self, SMTPServerProtocol.do_DATA, argument
        ):
            return
        message = self._open_message(chunked=False)
        if message is None:
            return
        # A receiver whose write() raises gets _body_failed (see _guarded_write).
        limits = self.limits
        self._mode = DataMode(
            message.receiver.write,
            self._data_done,
            self._body_failed,
            limits.max_message_size,
        )
        # (_set_mode, inline: the clock was read for the envelope just now)
        self._deadline = message.envelope.received_at + limits.data_timeout
        self.reply(R354_START_INPUT)

    def _body_failed(self) -> None:
        """The receiver's write() raised (called inside the handler): a 451
        at the end of the data, the receiver aborted, the rest dropped."""
        message = self._message
        assert message is not None
        message.failure = Failure()
        _abort_receiver(message.receiver)

    def _data_done(self, reader: DataReader) -> None:
        self._mode = self._lines  # (_set_mode with no deadline)
        self._deadline = None
        message = self._message
        assert message is not None
        message.end_of_data(reader.size, reader.too_big)

    def _open_message(self, chunked: bool) -> Optional[Message]:
        """Start the message (DATA or first BDAT); None if the handler failed."""
        factory = self.factory
        envelope = self.session.start_data(
            chunked, factory.reactor.seconds(), factory.received_header
        )
        try:
            kind = ChunkedMessage if chunked else Message
            message = kind(self._hooks.open_message(envelope), envelope, self)
        except Exception:
            failure = Failure()
            self._reply_failure(failure)
            self.session.message_done()
            if self._events is not None:
                outcome = "refused" if failure.check(SMTPError) else "failed"
                self._events.message_received(outcome, 0)
            return None
        self._message = message
        return message

    def do_BDAT(self, argument: str) -> None:
        """BDAT size [LAST] (RFC 3030): the chunk follows, whatever the answer."""
        size, last = bdat_argument(argument)
        message = self._message
        if message is None:
            if self._name is not None and self._name.hold(
                self, SMTPServerProtocol.do_BDAT, argument
            ):
                return
            message = self._open_message(chunked=True)
            if message is None:  # the handler's failure is answered
                drop_chunk(self, size)
                return
        assert isinstance(message, ChunkedMessage)
        message.read_chunk(self, size, last, _guarded_write)

    def _refuse_chunk(self, argument: str, refusal: Reply) -> None:
        try:
            size, _ = bdat_argument(argument)
        except SMTPError as error:
            # The chunk size is unknown, so what follows is read as commands.
            self._reply_bad(error.reply)
            return
        self._reply_bad(refusal)
        drop_chunk(self, size)

    def _abort_message(self) -> None:
        """RSET or a new greeting drops the message in flight, or else
        abandons the open transaction (a lost connection: connectionLost)."""
        if self._message is not None:
            self._message.abort()
        elif self._hooks.transaction_abandoned is not None:
            self._abandon()

    def _answered_after_close(self) -> None:
        # A check_sender or check_recipient (or the client's name) answered
        # after the close: the transaction as it now is ends here.
        if (
            self._hooks.transaction_abandoned
            and self._message is None
            and self._pending is None
        ):
            self._abandon()

    _abandoned: Optional[Envelope] = None  # the last transaction_abandoned told

    def _abandon(self) -> None:
        """The handler's C{transaction_abandoned}, once per open transaction."""
        hook = self._hooks.transaction_abandoned
        envelope = self.session.envelope if self.session is not None else None
        if hook and envelope is not None and envelope is not self._abandoned:
            self._abandoned = envelope
            tell_abandoned(hook, envelope)

    def do_RSET(self, argument: str) -> None:
        if argument:
            raise SMTPError(fill(R501_NO_ARGUMENTS, verb="RSET"))
        self._abort_message()
        self.session.reset()
        self.reply(R250_RESET)
        self._junk()

    def do_NOOP(self, argument: str) -> None:
        self.reply(R250_OK)
        self._junk()

    def _junk(self) -> None:
        """A command that moves no mail (NOOP, RSET, VRFY, HELP, BDAT 0).

        Past C{max_junk_commands} without a delivered message, each one
        counts as a bad command: a loop of them can't hold a session.
        """
        closing = self.session.junk_command()
        if closing is not None:
            self.close_with(fill(closing, hostname=self.factory.hostname))

    def do_QUIT(self, argument: str) -> None:
        self.reply(R221_BYE)
        self._close("quit")

    def do_VRFY(self, argument: str) -> None:
        if not argument:
            raise SMTPError(R501_SYNTAX_VRFY)
        self.reply(R252_CANNOT_VRFY)
        self._junk()

    def do_HELP(self, argument: str) -> None:
        """The commands this session can use now (no STARTTLS once TLS is on)."""
        commands = _help_commands(self.factory.extensions(self.session), self._COMMANDS)
        self.reply(fill(R214_HELP, commands=commands))
        self._junk()

    def do_EXPN(self, argument: str) -> None:
        raise SMTPError(R502_NOT_IMPLEMENTED)

    def do_STARTTLS(self, argument: str) -> None:
        if self.session.tls is not None:
            raise SMTPError(R503_ALREADY_TLS)
        context = self.factory.tls_context
        if context is None:
            raise SMTPError(R502_NOT_IMPLEMENTED)
        if argument:
            raise SMTPError(fill(R501_NO_ARGUMENTS, verb="STARTTLS"))
        self.reply(R220_STARTTLS)
        # Anything the client sent after STARTTLS in plaintext is an injection
        # attempt (CVE-2011-0411 class): drop it before the handshake.
        self.clearLineBuffer()
        self._flush()  # the 220 goes out in plaintext, before the handshake
        self._watch_output()  # before startTLS, which moves it to the TLS layer
        self._direct_write = False
        self.transport.startTLS(context)
        self.session.tls_started(TLSInfo("", ""))
        self._expect_handshake()

    # -- XCLIENT (Postfix's XCLIENT_README): a trusted proxy names the client -
    def do_XCLIENT(self, argument: str) -> None:
        session = self.session
        update = xclient_update(session, argument)
        self._abort_message()
        old_ip, look_up = forward_client(session, update, self.factory.xclient_hosts)
        if look_up is not None and self._name is not None:
            self._name.forget()  # the proxy's word replaces the lookup
        if look_up:
            self._look_up_name(look_up)
        refusal = self.factory.readmit(self, old_ip)
        if refusal is not None:
            self.close_with(refusal)
            return
        # A fresh greeting, after the handler's verdict on the real client.
        self._run(
            "check_client",
            self._hooks.check_client,
            (session.peer,),
            self._greet_again,
            self._shun,
        )

    def _greet_again(self, _: Any) -> None:
        self.reply(self.factory.greeting)

    # -- AUTH: the policy judges, an AuthExchange runs it -----------------------
    def do_AUTH(self, argument: str) -> None:
        auth = self.factory.auth
        if auth is None:
            raise SMTPError(R502_NOT_IMPLEMENTED)
        AuthExchange(self, auth).start(argument)


#: HELP lists the verbs in this order
_HELP_ORDER = (
    "HELO",
    "EHLO",
    "MAIL",
    "RCPT",
    "DATA",
    "BDAT",
    "RSET",
    "NOOP",
    "QUIT",
    "VRFY",
    "EXPN",
    "HELP",
    "STARTTLS",
    "AUTH",
)


def _guarded_write(message: Message) -> Callable[[bytes], None]:
    """C{message.receiver.write}, but a receiver that raises is a 451.

    The failure is kept for the end of the data (or of the chunk), the
    receiver aborted, and the rest of the message read and dropped; the
    session goes on.
    """
    receiver_write = message.receiver.write

    def write(data: bytes) -> None:
        if message.failure is None:
            try:
                receiver_write(data)
            except Exception:
                message.failure = Failure()
                _abort_receiver(message.receiver)

    return write


def _help_commands(keywords: list[str], verbs: Any) -> str:
    """The verbs HELP lists for a session with these EHLO C{keywords}."""
    usable = {
        "BDAT": "CHUNKING" in keywords,
        "STARTTLS": "STARTTLS" in keywords,
        "AUTH": any(keyword.startswith("AUTH ") for keyword in keywords),
        "EXPN": False,  # always 502
    }
    commands = [verb for verb in _HELP_ORDER if usable.get(verb, True)]
    # Verbs a subclass added come last.
    commands += sorted(set(verbs) - set(_HELP_ORDER))
    return " ".join(commands)


def _verb_table(cls: type) -> dict[str, Callable[..., None]]:
    """Verb -> C{do_VERB} of C{cls}: overrides and new verbs of subclasses count."""
    return {
        name[3:]: getattr(cls, name)
        for name in dir(cls)
        if name.startswith("do_") and callable(getattr(cls, name))
    }


SMTPServerProtocol._COMMANDS = _verb_table(SMTPServerProtocol)


def _log_session_closed(session: Session) -> None:
    peer = address_text(session.peer)
    emit_summary(
        _log,
        {
            "summary": f"smtpd session {session.session_id} from {peer} closed"
            f" after {session.messages} messages",
            "session_id": session.session_id,
            "peer": peer,
            "messages": session.messages,
        },
    )


def _mask(line: bytes) -> bytes:
    """AUTH payloads never reach a log, whatever whitespace separates them.

    (A tab after C{AUTH PLAIN} is no command we parse, but the line is
    logged all the same.)
    """
    if line[:4].upper() == b"AUTH" and line[4:5].isspace():
        parts = line.split(None, 2)
        return b" ".join(parts[:2] + ([b"****"] if len(parts) > 2 else []))
    return line


class LMTPServerProtocol(SMTPServerProtocol):
    """One LMTP session (RFC 2033): LHLO instead of EHLO, and one reply per
    accepted recipient after the data (see L{twisted_smtpd._outcomes}).

    Built by C{SMTPFactory(..., lmtp=True)}; subclass it like
    L{SMTPServerProtocol}.
    """

    lmtp = True

    def _answer_failure(self, name: str, failure: Failure) -> None:
        if name != "message":  # that one is answered per recipient
            super()._answer_failure(name, failure)

    def do_LHLO(self, argument: str) -> None:
        SMTPServerProtocol.do_EHLO(self, argument)

    def do_EHLO(self, argument: str) -> None:
        raise SMTPError(R500_USE_LHLO)

    def do_HELO(self, argument: str) -> None:
        raise SMTPError(R500_USE_LHLO)
